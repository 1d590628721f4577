"""Fine-tuning: labels, learning (full and LoRA), LoRA merge, 2-process training, the demo model, bad samples.

Tiny random models (hidden 128, 2 decoder layers, a 2-block EVA tower, 4 query tokens, slicing on) with the real
Mistral v0.1 tokenizer, trained for a few dozen steps on the synthetic shapes task (`omnilmm_tools.shapes`).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnilmm_tools.cli import free_port
from omnilmm_tools import finetune, shapes
from omnilmm_tools.remote import remote_module

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "demo_model"

TINY_CONFIG = {
    "vocab_size": 32009,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vision_tower_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 56},
    "num_query": 4,
    "image_size": 56,
    # 112 x 112 images with scale_resolution 56: a 56 x 56 source and a 2 x 2 grid of 56 x 56 tiles per image.
    "image_processor": {"slice_mode": True, "scale_resolution": 56, "max_slice_nums": 4},
}
IMAGE_SIZE = 112


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune")
    (path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    shapes.write_dataset(path / "data", n=96, seed=0, size=IMAGE_SIZE)
    return path


@pytest.fixture(scope="module")
def processor(workdir):
    from omnilmm_tools.tokenizer import build_tokenizer

    image_processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(**TINY_CONFIG["image_processor"])
    return remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), num_query=TINY_CONFIG["num_query"]
    )


def losses(output_dir) -> list[float]:
    log = json.loads((Path(output_dir) / "train_log.json").read_text())
    return [entry["loss"] for entry in log["log_history"] if "loss" in entry]


def train(workdir, name, *extra) -> Path:
    output = workdir / name
    finetune.main(["--init-config", str(workdir / "tiny.json"), "--data", str(workdir / "data" / "data.json"),
                   "--output", str(output), "--logging-steps", "1", "--report-to", "none", *extra])
    return output


# ------------------------------------------------------------------------------------------------------------------
# (a) labels
# ------------------------------------------------------------------------------------------------------------------


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The [start, stop) runs of True in a 1-D bool tensor."""
    out, start = [], None
    for i, flag in enumerate(mask.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    return out


def test_labels_only_on_assistant_turns_multi_image_multi_turn(workdir, processor):
    """Two images (their keys written in the text in reverse order), three turns, slicing on: only the assistant
    tokens and their closing </s> carry labels, and the images take the spans in the order of their placeholders."""
    images = workdir / "label_images"
    images.mkdir(exist_ok=True)
    rng = __import__("random").Random(3)
    paths = []
    for k in range(2):
        paths.append(images / f"{k}.png")
        shapes.make_item(rng, size=IMAGE_SIZE).image.save(paths[-1])
    answers = ["The second image shows a red square.", "blue", "There are two images, sir."]
    sample = {
        "id": "multi",
        "image": {"<image_00>": str(paths[0]), "<image_01>": str(paths[1])},
        "conversations": [
            {"role": "user", "content": "Look: <image_01>\nand <image_00>\nWhat is in the first one?"},
            {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": "What colour?"},
            {"role": "assistant", "content": answers[1]},
            {"role": "user", "content": "How many images?"},
            {"role": "assistant", "content": answers[2]},
        ],
    }
    data = workdir / "labels.json"
    data.write_text(json.dumps([sample]))
    dataset = finetune.SupervisedDataset(data, processor)
    example = dataset[0]
    ids, labels = example["input_ids"], example["labels"]
    tokenizer = processor.tokenizer

    labelled = labels != -100
    assert torch.equal(labels[labelled], ids[labelled])
    pieces = [tokenizer.decode(ids[a:b]) for a, b in runs(labelled)]
    assert pieces == [answer + "</s>" for answer in answers]
    assert all(tokenizer.decode(ids[b - 1 : b]) == "</s>" for _, b in runs(labelled))
    # Nothing else: no image, system, user or template token is labelled.
    for token in ("<im_start>", "<im_patch>", "<im_end>"):
        assert not labelled[ids == tokenizer.convert_tokens_to_ids(token)].any()

    # Slicing: every image is a source + 2 x 2 tiles = 5 spans, 10 in all, in placeholder order (image 1 first).
    assert int((ids == processor.im_start_token_id).sum()) == 10 == len(example["pixel_values"])
    expected = processor.image_processor([[str(paths[1]), str(paths[0])]])["pixel_values"][0]
    assert all(torch.equal(a, b) for a, b in zip(example["pixel_values"], expected))

    # The prompt part is token for token what the processor makes at inference for the first user turn.
    first_turn = [{"role": "user", "content": sample["conversations"][0]["content"].replace("<image_01>", "<image>").replace("<image_00>", "<image>")}]
    prompt = processor.apply_chat_template(first_turn, add_generation_prompt=True, tokenize=False)
    inference = processor(text=[prompt], images=[[str(paths[1]), str(paths[0])]], return_tensors="pt")["input_ids"][0]
    assert torch.equal(ids[: len(inference)], inference)
    assert not labelled[: len(inference)].any() and labelled[len(inference)]


def test_video_samples_are_trained_on_like_images(workdir, processor):
    """MiniCPM-V-format samples with videos (`"video": "clip.mp4"` with no placeholder, or a keyed `<video_00>` beside
    an `<image>`): the processor samples the frames at the placeholder, only the answers carry labels, and a few
    steps of `omnilmm-finetune` train on them."""
    import random

    from omnilmm_tools import clips

    folder = workdir / "videos"
    folder.mkdir(exist_ok=True)
    made = []
    for seed in range(2):
        frames, shape = clips.shape_frames(random.Random(seed), seconds=4, fps=4, size=IMAGE_SIZE)
        made.append((clips.write_video(folder / f"clip{seed}.mp4", frames, 4).name, shape))
    shapes.make_item(random.Random(5), size=IMAGE_SIZE).image.save(folder / "photo.png")
    samples = [
        {"id": "plain", "video": made[0][0], "conversations": [
            {"role": "user", "content": "What colour is the shape?"}, {"role": "assistant", "content": made[0][1].colour}]},
        {"id": "keyed", "video": {"<video_00>": made[1][0]}, "image": "photo.png", "conversations": [
            {"role": "user", "content": "<image>\nand <video_00>\nWhat shape moves?"},
            {"role": "assistant", "content": made[1][1].kind}]},
    ] * 4
    data = folder / "data.json"
    data.write_text(json.dumps(samples))
    dataset = finetune.SupervisedDataset(data, processor, video_kwargs={"max_num_frames": 3})
    for index, (name, shape) in enumerate(made):
        example = dataset[index]
        ids, labels = example["input_ids"], example["labels"]
        answer = shape.colour if index == 0 else shape.kind
        assert processor.tokenizer.decode(ids[labels != -100]) == answer + "</s>"
        video = processor.video_processor(str(folder / name), max_num_frames=3)["pixel_values_videos"][0]
        own = example["pixel_values"][-len(video):]  # the video comes last in both samples
        assert all(torch.equal(a, b) for a, b in zip(own, video))
        assert int((ids == processor.im_start_token_id).sum()) == len(example["pixel_values"])
    output = workdir / "video-run"
    finetune.main(["--init-config", str(workdir / "tiny.json"), "--data", str(data), "--output", str(output),
                   "--max-steps", "4", "--batch-size", "2", "--logging-steps", "1", "--report-to", "none",
                   "--max-num-frames", "3"])
    assert len(losses(output)) == 4 and all(torch.isfinite(torch.tensor(losses(output))))


def test_sparse_head_loss_equals_model_loss(workdir, processor):
    """The trainer runs the LM head on labelled positions only; its loss is the model's own loss."""
    from transformers import TrainingArguments

    torch.manual_seed(0)
    settings = {k: v for k, v in TINY_CONFIG.items() if k != "image_processor"}
    model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(remote_module("configuration_omnilmm").OmniLMMConfig(**settings))
    dataset = finetune.SupervisedDataset(workdir / "data" / "data.json", processor)
    batch = finetune.Collator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    batch["pixel_values"][1] = []  # a text-only sample in the batch is fine
    batch["input_ids"][1][batch["input_ids"][1] >= 32000] = 1000
    trainer = finetune.make_trainer_class()(
        model=model, args=TrainingArguments(output_dir=str(workdir / "unused"), report_to="none"), train_dataset=dataset
    )
    with torch.no_grad():
        expected = model(**batch).loss
        loss = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# (b) learning, (c) LoRA merge
# ------------------------------------------------------------------------------------------------------------------


def test_full_finetune_reduces_loss_and_saves_a_hub_folder(workdir):
    output = train(workdir, "full", "--max-steps", "30", "--batch-size", "4", "--lr", "2e-3", "--save-dtype", "bfloat16")
    curve = losses(output)
    first, last = curve[0], sum(curve[-3:]) / 3
    print(f"full fine-tune: first loss {first:.3f}, mean of the last three {last:.3f}")
    assert last < 0.5 * first, curve

    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype="auto")
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "OmniLMMForCausalLM"
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    assert type(processor).__name__ == "OmniLMMProcessor" and processor.image_processor.slice_mode
    for name in ("configuration_omnilmm.py", "modeling_omnilmm.py", "resampler.py", "processing_omnilmm.py",
                 "image_processing_omnilmm.py", "generation_config.json", "model.safetensors"):
        assert (output / name).is_file(), name


@pytest.fixture(scope="module")
def lora_run(workdir):
    return train(workdir, "lora", "--lora", "--lora-r", "16", "--lora-alpha", "32", "--merge-lora", "--max-steps", "30",
                 "--batch-size", "4", "--lr", "5e-3", "--no-tune-vision")


def test_lora_reduces_loss(lora_run):
    curve = losses(lora_run)
    first, last = curve[0], sum(curve[-3:]) / 3
    print(f"LoRA: first loss {first:.3f}, mean of the last three {last:.3f}")
    assert last < first - 1.0, curve


def test_lora_targets_only_decoder_attention(lora_run):
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    keys = list(load_file(lora_run / "adapter" / "adapter_model.safetensors"))
    lora_keys = [k for k in keys if "lora_" in k]
    assert lora_keys and all(".model.layers." in k and ".self_attn." in k for k in lora_keys), lora_keys[:5]
    assert {k.split(".self_attn.")[1].split(".")[0] for k in lora_keys} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any("vision_tower" in k for k in keys)
    assert any("resampler" in k for k in keys)  # trained fully, saved with the adapter
    assert config["modules_to_save"] == ["resampler"]


def test_merged_lora_matches_unmerged_peft_model(lora_run, processor):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(lora_run, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(lora_run / "base_model", trust_remote_code=True, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, lora_run / "adapter").eval()

    item = shapes.eval_items(seed=99, n=1, size=IMAGE_SIZE)[0]
    prompt = processor.apply_chat_template([{"role": "user", "content": f"<image>\n{item.question}"}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[[item.image]], return_tensors="pt")
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  pixel_values=inputs["pixel_values"], do_sample=False, max_new_tokens=8, min_new_tokens=8)
    with torch.no_grad():
        merged_tokens = merged.generate(**kwargs)
        unmerged_tokens = unmerged.generate(**kwargs)
        merged_logits = merged(**{k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        unmerged_logits = unmerged(**{k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        with unmerged.disable_adapter():
            base_logits = unmerged(**{k: kwargs[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    assert torch.equal(merged_tokens, unmerged_tokens)
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=1e-4, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-2  # the adapter did change the model


# ------------------------------------------------------------------------------------------------------------------
# (d) two processes
# ------------------------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------------------------
# (d) two processes
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharding_run(workdir):
    """The data and arguments of the multi-process tests, and the 1-process run with their global batch of 4.
    Samples 1-3 are text-only, so in the first step rank 1 (samples 2-3, or 1 and 3) has no image and its vision
    tower and resampler get no gradient (DDP must cope with the unused parameters)."""
    samples = json.loads((workdir / "data" / "data.json").read_text())[:16]
    for index in (1, 2, 3):
        samples[index] = {"id": f"text-{index}", "conversations": [
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "red"}]}
    data = workdir / "mixed.json"
    data.write_text(json.dumps(samples))
    common = ["--init-config", str(workdir / "tiny.json"), "--data", str(data), "--no-shuffle", "--max-steps", "4",
              "--lr", "2e-3", "--logging-steps", "1", "--report-to", "none", "--seed", "0"]
    one = workdir / "one-process"
    finetune.main([*common, "--batch-size", "4", "--output", str(one)])
    return common, one


def greedy_answers(folder) -> list[str]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    items = shapes.eval_items(seed=2027, n=4, size=IMAGE_SIZE)
    return [model.chat(image=item.image, msgs=[{"role": "user", "content": item.question}], sampling=False,
                       max_new_tokens=4, min_new_tokens=4) for item in items]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_match_one_process_with_the_same_global_batch(workdir, sharding_run, sharding):
    """torchrun with 2 CPU processes (gloo), 2 samples each, against 1 process with 4: the same samples make each
    step's global batch, so the per-step losses agree (rel 1e-3: the sums may run in another order), and so do the
    saved models' greedy answers. DDP (`omnilmm-finetune` under torchrun) keeps a whole model per process; FSDP2
    (tests/fsdp_worker.py: accelerate shards only on accelerators) keeps half of it; DeepSpeed ZeRO-2 shards the
    optimiser state and gradients, ZeRO-3 the parameters too (`--deepspeed configs/...`, its CPU accelerator)."""
    common, one = sharding_run
    two = workdir / f"two-processes-{sharding}"
    # DeepSpeed builds a C++ op per torch build; .venv and .venv-vllm would share one cache folder (and its lock)
    extensions = Path.home() / ".cache" / "torch_extensions" / f"omnilmm-torch-{torch.__version__}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(extensions)}
    program = [str(ROOT / "tests" / "fsdp_worker.py")] if sharding == "fsdp" else ["-m", "omnilmm_tools.finetune"]
    if sharding.startswith("zero"):
        program += ["--deepspeed", str(ROOT / "configs" / f"deepspeed_{sharding}.json")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *program, *common, "--batch-size", "2", "--output", str(two)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads((two / "train_log.json").read_text())
    assert log["world_size"] == 2 and log["global_step"] == 4 and log["fsdp"] == (sharding == "fsdp")
    if sharding == "fsdp":
        assert 0.45 < log["local_parameter_fraction"] < 0.55, log["local_parameter_fraction"]
    print("1 process:", losses(one), f"\n2 processes ({sharding}):", losses(two))
    assert losses(two) == pytest.approx(losses(one), rel=1e-3)
    assert greedy_answers(two) == greedy_answers(one)


def test_fine_tuning_keeps_the_base_generation_config_unless_told(workdir):
    base = json.loads((DEMO_MODEL / "generation_config.json").read_text())
    common = ["--model", str(DEMO_MODEL), "--data", str(workdir / "data" / "data.json"), "--max-steps", "1",
              "--batch-size", "2", "--no-tune-vision", "--report-to", "none"]
    finetune.main([*common, "--output", str(workdir / "kept")])
    kept = json.loads((workdir / "kept" / "generation_config.json").read_text())
    assert {k: v for k, v in kept.items() if k != "transformers_version"} == \
        {k: v for k, v in base.items() if k != "transformers_version"}
    finetune.main([*common, "--output", str(workdir / "sampling"), "--generation-config", "sampling"])
    sampling = json.loads((workdir / "sampling" / "generation_config.json").read_text())
    assert sampling["do_sample"] is True and sampling["temperature"] == 0.6 and base.get("do_sample") is not True


def test_fsdp_through_trainer_is_refused_on_cpu_with_the_reason(workdir, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--init-config", str(workdir / "tiny.json"), "--data", "d.json", "--output", "o", "--fsdp"])
    assert "--fsdp needs GPUs (or other accelerators): accelerate shards only there" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# (e) the demo model
# ------------------------------------------------------------------------------------------------------------------


def test_demo_model_answers_fresh_images_and_needs_the_image(capsys):
    from omnilmm_tools import eval_shapes

    model, processor = eval_shapes.load(DEMO_MODEL, "cpu")
    seed, n = 2027, 200  # a seed no training run used; 40 questions per type
    result = eval_shapes.evaluate(model, processor, seed, n)
    control = eval_shapes.evaluate(model, processor, seed, n, shuffle_images=True)
    print(eval_shapes.format_table(result), eval_shapes.format_table(control), sep="\n")
    for qtype in ("colour", "shape"):
        assert result["accuracy"][qtype] >= 0.9, result["accuracy"]
        # another question's image: near chance (1/6 colours, 1/4 shapes), far below the real answers
        assert control["accuracy"][qtype] <= 0.45, (result["accuracy"], control["accuracy"])
    total = sum(DEMO_MODEL.joinpath(f).stat().st_size for f in os.listdir(DEMO_MODEL) if DEMO_MODEL.joinpath(f).is_file())
    assert total <= 20 * 10**6


def test_demo_stage_one_trains_the_vision_side_only(workdir):
    """scripts/pretrain_demo_vision.py (the demo model's stage 1), a few steps with slicing on: it writes a Hub folder
    whose vision tower changed and whose language model did not, plus its accuracy log."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pretrain_demo_vision
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    output = workdir / "stage1"
    pretrain_demo_vision.main(["--init-config", str(workdir / "tiny.json"), "--output", str(output), "--steps", "3",
                               "--batch-size", "4", "--size", str(IMAGE_SIZE), "--lr", "1e-2"])
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    torch.manual_seed(0)
    fresh, _ = finetune.init_from_config(str(workdir / "tiny.json"))
    assert torch.equal(trained.model.embed_tokens.weight, fresh.model.embed_tokens.weight)
    assert not torch.equal(trained.model.vision_tower.patch_embed.proj.weight, fresh.model.vision_tower.patch_embed.proj.weight)
    log = json.loads((output / "stage1_log.json").read_text())
    assert log["steps"] == 3 and set(log["log"][-1]["accuracy"]) == {"shape", "colour", "count", "position"}


def test_eval_and_chat_commands(capsys):
    from omnilmm_tools import chat_cli, eval_shapes

    eval_shapes.main(["--model", str(DEMO_MODEL), "--seed", "31", "--n", "8"])
    out = capsys.readouterr().out
    assert "| colour | 2 |" in out and "| all | 8 |" in out
    chat_cli.main(["--image", str(ROOT / "assets" / "sample.png"), "What colour is the shape?"])
    answer = capsys.readouterr().out.strip()
    assert answer in shapes.COLOURS, answer


# ------------------------------------------------------------------------------------------------------------------
# (f) bad samples
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_data(workdir):
    good = json.loads((workdir / "data" / "data.json").read_text())[:3]
    image = good[0]["image"]
    bad = [
        {"id": "missing-image", "image": str(workdir / "nowhere.png"), "conversations": good[0]["conversations"]},
        {"id": "two-placeholders", "image": image, "conversations": [
            {"role": "user", "content": "<image>\n<image>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]},
        {"id": "unknown-key", "image": {"<image_00>": image, "<image_01>": image}, "conversations": [
            {"role": "user", "content": "<image_00>\nWhat colour is the shape?"}, {"role": "assistant", "content": "red"}]},
    ]
    path = workdir / "bad.json"
    path.write_text(json.dumps(good[:1] + bad + good[1:]))
    return path


def test_bad_samples_are_skipped_by_name(bad_data, processor, capsys):
    dataset = finetune.SupervisedDataset(bad_data, processor, bad_sample="skip")
    assert len(dataset) == 3
    assert dataset.skipped == ["missing-image", "two-placeholders", "unknown-key"]
    err = capsys.readouterr().err
    assert "'missing-image'" in err and "does not exist" in err
    assert "'two-placeholders'" in err and "2 image placeholders in the text but 1 images" in err
    assert "'unknown-key'" in err and "<image_01>" in err
    assert len(dataset[0]["pixel_values"]) == 5


def test_bad_sample_stops_the_run_by_name(workdir, bad_data):
    with pytest.raises(SystemExit, match="missing-image"):
        finetune.main(["--init-config", str(workdir / "tiny.json"), "--data", str(bad_data),
                       "--output", str(workdir / "stopped"), "--bad-sample", "stop", "--max-steps", "1"])
    assert not (workdir / "stopped" / "model.safetensors").exists()


def test_qlora_trains_the_demo_model_and_its_adapter_answers_on_the_full_precision_base(tmp_path):
    """QLoRA (`--qlora`: LoRA on a 4-bit NF4 decoder, bitsandbytes, here on the CPU) teaches the demo model a new
    answer format; the adapter, put on the full-precision model, answers in it, about a picture it never saw."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = shapes.write_dataset(tmp_path / "data", n=48, seed=5)
    samples = json.loads(data.read_text())
    for sample in samples:
        for turn in sample["conversations"]:
            if turn["role"] == "assistant":
                turn["content"] = f"{turn['content']}, I think."
    data.write_text(json.dumps(samples))
    output = tmp_path / "qlora"
    finetune.main(["--model", str(DEMO_MODEL), "--data", str(data), "--output", str(output), "--qlora",
                   "--lora-r", "16", "--lora-alpha", "32", "--max-steps", "200", "--batch-size", "4", "--lr", "1e-3",
                   "--no-tune-vision", "--logging-steps", "1", "--report-to", "none"])
    curve = losses(output)
    print(f"QLoRA: losses {[round(loss, 3) for loss in curve]}")
    assert sum(curve[-3:]) / 3 < 0.5 * curve[0], curve
    assert (output / "adapter_model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32).eval()
    item = shapes.eval_items(seed=77, n=1)[0]
    image = item.image
    question = [{"role": "user", "content": item.question}]
    before = base.chat(image=image, msgs=question, sampling=False, max_new_tokens=8)
    adapted = PeftModel.from_pretrained(base, output).eval()
    after = adapted.chat(image=image, msgs=question, sampling=False, max_new_tokens=8)
    assert before == item.answer and after == f"{item.answer}, I think.", (before, after)
