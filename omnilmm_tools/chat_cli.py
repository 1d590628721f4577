"""`omnilmm-chat`: ask an OmniLMM model a question about an image, from the command line.

    omnilmm-chat --image assets/sample.png "What colour is the shape?"

`--model` defaults to the repository's demo model (`demo_model/`, a tiny OmniLMM trained on the shapes task: it
answers colour, shape, position and count questions about images like `assets/sample.png`, nothing else).
Decoding is greedy unless `--sample` is given.
"""

import argparse
import sys
from pathlib import Path

import torch

from .cpu_decoding import block_lm_head


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "demo_model"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="omnilmm-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", help="the question, e.g. \"What colour is the shape?\"")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeat for several images)")
    parser.add_argument("--model", default=str(default_model_dir()), help="a Hub folder (default: the repo's demo_model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample (generation_config.json's settings) instead of greedy")
    parser.add_argument("--max-slice-nums", type=int, default=None, help="most tiles per image (default: the processor's)")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    if not Path(args.model).is_dir():
        sys.exit(f"omnilmm-chat: {args.model} is not a model folder")
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor
    from transformers.utils import logging

    logging.disable_progress_bar()  # the answer alone on the terminal

    images = []
    for path in args.image:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            sys.exit(f"omnilmm-chat: cannot read the image {path}: {error}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype).to(device).eval()
    block_lm_head(model)  # faster CPU decoding of small batches
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    torch.manual_seed(0)
    answer = model.chat(
        msgs=[{"role": "user", "content": [*images, args.question]}],
        processor=processor,
        sampling=args.sample,
        max_new_tokens=args.max_new_tokens,
        max_slice_nums=args.max_slice_nums,
        system_prompt=args.system_prompt,
    )
    print(answer)


if __name__ == "__main__":
    main()
