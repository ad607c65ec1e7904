"""Time class-name encoding with the CLIP text tower over the used context vs OpenCLIP's full 77-token context.

    python scripts/benchmarks/benchmark_text_encoding.py [--dataset coco_panoptic] [--num_classes 20] [--clip_model_name
    NAME]

Builds the text tower of ``--clip_model_name`` (default: the paper's ConvNeXt-B, ``convnext_base_w``) with random
weights (nothing is downloaded; the cost does not depend on the weights), encodes the first ``--num_classes`` class
names of ``--dataset`` with all their synonyms and DEARLi's 14 prompt templates, once with
``ClipTextEncoder.encode_tokens`` (what the model uses: the tower runs only up to the longest prompt's end-of-text
token) and once with OpenCLIP's ``encode_text`` on the full context, and prints both times, the ratio and the largest
difference between the two embeddings.
"""

import training.run_as_script  # noqa: F401  (first: keeps this file's folder off sys.path, see there)

# isort: split
import argparse
import copy
import time

import torch
from torch.nn import functional as F

from modeling_dearli.clip_backbone import ClipTextEncoder, build_open_clip_model
from modeling_dearli.configuration_dearli import DearliConfig, split_synonyms
from training import cli
from training.data.class_names import load_class_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="coco_panoptic",
                        help="Class-name list shipped in training/data/assets/class_names/.")
    parser.add_argument("--num_classes", type=int, default=20, help="Encode the first N classes (0: all).")
    parser.add_argument("--clip_model_name", default="convnext_base_w", help="OpenCLIP architecture of the tower.")
    parser.add_argument("--batch_size", type=int, default=256, help="Prompts per forward pass.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = list(load_class_names(args.dataset).names)
    names = names[: args.num_classes] if args.num_classes else names
    synonyms = [s for name in names for s in split_synonyms(name)]
    templates = DearliConfig().prompt_templates
    model_config = DearliConfig(clip_model_name=args.clip_model_name).clip_model_config
    clip = build_open_clip_model(model_config).eval()
    reference = copy.deepcopy(clip)
    encoder = ClipTextEncoder(clip, model_config["text_cfg"])
    tokens = encoder.tokenize([t.format(s) for s in synonyms for t in templates])
    used = int(tokens.argmax(-1).max()) + 1
    print(f"{len(names)} classes, {len(synonyms)} synonyms x {len(templates)} templates = {len(tokens)} prompts; "
          f"longest prompt {used} of {tokens.shape[1]} tokens; {torch.get_num_threads()} threads")
    timings, outputs = {}, {}
    methods = (("used context (ours)", encoder.encode_tokens), ("full context (OpenCLIP)", reference.encode_text))
    for label, encode in methods:
        start = time.perf_counter()
        with torch.no_grad():
            outputs[label] = torch.cat([F.normalize(encode(tokens[i : i + args.batch_size]).float(), dim=-1)
                                        for i in range(0, len(tokens), args.batch_size)])
        timings[label] = time.perf_counter() - start
        print(f"{label:>24}: {timings[label]:8.2f} s")
    ours, full = timings["used context (ours)"], timings["full context (OpenCLIP)"]
    difference = (outputs["used context (ours)"] - outputs["full context (OpenCLIP)"]).abs().max()
    print(f"speed-up: {full / ours:.2f}x; max |difference| of normalised embeddings: {float(difference):.2e}")


if __name__ == "__main__":
    cli.run(main)
