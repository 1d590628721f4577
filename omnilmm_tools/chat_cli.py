"""`omnilmm-chat`: ask an OmniLMM model a question about an image or a video, from the command line.

    omnilmm-chat --image assets/sample.png "What colour is the shape?"
    omnilmm-chat --video clip.mp4 "What colour is the shape?"      # (PyAV: pip install "omnilmm-hf[video]")

`--model` defaults to the repository's demo model (`demo_model/`, a tiny OmniLMM trained on the shapes task: it
answers colour, shape, position and count questions about images like `assets/sample.png`, nothing else).
Decoding is greedy unless `--sample` is given.
"""

from pathlib import Path

import torch

from .cli import Parser, fail, load_dtype, positive_float, positive_int, torch_device
from .cpu_decoding import block_lm_head
from .remote import DEMO_MODEL


def main(argv=None) -> None:
    parser = Parser("omnilmm-chat", __doc__.split("\n\n")[0])
    parser.add_argument("question", help="the question, e.g. \"What colour is the shape?\"")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several images)")
    parser.add_argument("--video", action="append", default=[],
                        help="a video file (repeat for several; sampled at --fps, at most --max-num-frames frames)")
    parser.add_argument("--fps", type=positive_float, default=None, help="video frames sampled per second (1)")
    parser.add_argument("--max-num-frames", type=positive_int, default=None,
                        help="most frames sampled from a video (64)")
    parser.add_argument("--model", default=str(DEMO_MODEL),
                        help="a Hub folder (default: the demo model that comes with this package)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer in tokens")
    parser.add_argument("--sample", action="store_true",
                        help="sample (generation_config.json's settings) instead of greedy decoding")
    parser.add_argument("--max-slice-nums", type=positive_int, default=None,
                        help="most tiles per image, 1 = no slicing (default: the processor's)")
    parser.add_argument("--system-prompt", default=None, help="a system message before the question")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="cpu, cuda, cuda:1, mps ... (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)

    if not (Path(args.model) / "config.json").is_file():
        fail(parser.prog, f"{args.model} is not a model folder (it has no config.json)")
    for kind, paths in (("image", args.image), ("video", args.video)):
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            fail(parser.prog, f"no {kind} file at {', '.join(missing)}")
    from transformers import AutoModelForCausalLM, AutoProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()  # the answer alone on the terminal

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 dtype=load_dtype(args.model, device)).to(device).eval()
    block_lm_head(model)  # faster CPU decoding of small batches
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    torch.manual_seed(0)
    try:
        videos = [{"type": "video", "video": path} for path in args.video]
        sampling = {key: value for key, value in (("fps", args.fps), ("max_num_frames", args.max_num_frames)) if value}
        answer = model.chat(  # paths: read upright (EXIF orientation, a video's rotation), as viewers show them
            msgs=[{"role": "user", "content": [*map(Path, args.image), *videos, args.question]}],
            **sampling,
            processor=processor,
            sampling=args.sample,
            max_new_tokens=args.max_new_tokens,
            max_slice_nums=args.max_slice_nums,
            system_prompt=args.system_prompt,
        )
    except (ValueError, TypeError, ImportError) as error:  # an unreadable image, no PyAV ...: the model names it
        fail(parser.prog, error)
    print(answer)


if __name__ == "__main__":
    main()
