"""TRL's `SFTTrainer` fine-tunes OmniLMM the way it fine-tunes transformers' own VLMs: a dataset of `messages` with
image parts, the processor as `processing_class`, nothing OmniLMM-specific."""

import random

import torch
import transformers
import trl
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoProcessor

from conftest import ROOT
from omnilmm_tools import shapes

DEMO_MODEL = ROOT / "demo_model"
# TRL computes the assistant-only masks of VLM conversations from transformers 5.18 on; on older versions the same
# conversations go in TRL's conversational prompt-completion form, whose loss is on the completion (the answer) only.
ASSISTANT_MASKS = Version(transformers.__version__) >= Version("5.18.0")


def shape_conversations(seed, n):
    """`n` rows `{"messages": [...], "images": [...]}` teaching a new answer format: "It is <colour>."."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        scene = shapes.random_scene(rng, 1)
        rows.append({"images": [shapes.draw(scene, rng)], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the shape."}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is {scene[0].colour}."}]},
        ]})
    return rows


def test_sft_trainer_fine_tunes_and_the_saved_folder_chats(tmp_path):
    from datasets import Dataset

    rows = shape_conversations(seed=5, n=40)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=20, per_device_train_batch_size=4,
                         learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         assistant_only_loss=ASSISTANT_MASKS, max_length=None, seed=0)
    if not ASSISTANT_MASKS:
        rows = [{"images": r["images"], "prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows]
    dataset = Dataset.from_list(rows)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"transformers {transformers.__version__}, assistant masks {ASSISTANT_MASKS}: losses", losses)
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses

    trainer.save_model(str(tmp_path / "tuned"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", trust_remote_code=True, dtype=torch.float32)
    tuned_processor = AutoProcessor.from_pretrained(tmp_path / "tuned", trust_remote_code=True)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), model.state_dict().values()))
    test = shape_conversations(seed=2027, n=1)[0]
    answer = tuned.chat(image=test["images"][0], msgs=[{"role": "user", "content": "Describe the shape."}],
                        processor=tuned_processor, sampling=False, max_new_tokens=8)
    assert answer.startswith("It is"), answer  # the new answer format (the demo model answers one word)
