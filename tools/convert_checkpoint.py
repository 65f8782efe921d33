"""Convert samoe checkpoints: to another parallel layout, to a plain PyTorch model, to and from Hugging Face.

    # weights-only copy of the newest checkpoint, loadable at any EP size / world size
    python tools/convert_checkpoint.py reshard --load runs/a/ckpt --save runs/a/ckpt_ep1 \\
        [--expert-model-parallel-size 1 --tensor-model-parallel-size 1 --world-size 1]
    # the plain model (samoe_dist/export/plain_gpt.py): model.safetensors + model.json
    python tools/convert_checkpoint.py export --load runs/a/ckpt --output exported/model.safetensors
    # a plain model back into a weights-only training checkpoint (then: pretrain_samoe.py --load ...)
    python tools/convert_checkpoint.py import --input exported/model.safetensors --save runs/b/ckpt
    # a Hugging Face folder: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), AutoTokenizer
    python tools/convert_checkpoint.py export-hf --load runs/a/ckpt --output hf/a [--format mixtral] [--overwrite]
    # a Mixtral folder into a weights-only standard-MoE checkpoint (trains at any EP size)
    python tools/convert_checkpoint.py import-hf --input mixtral_dir --save runs/c/ckpt
    # a standard MoE's L*N experts as a pool of P + combination logits (a SaMoE checkpoint that trains on)
    python tools/convert_checkpoint.py compress --load runs/moe/ckpt --pool-size 16 --save runs/samoe/ckpt

``--load`` takes a run's --save directory (its ``latest`` checkpoint) or one ``iter_*`` directory.
A weights-only checkpoint resumes with a fresh optimizer at iteration 0; give the trainer the
model flags the checkpoint was trained with (they are checked). Outputs are written under a
temporary name and renamed when complete; existing outputs are never overwritten without
``--overwrite`` (export) and --save must be a new or empty directory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from samoe_dist.config import ConfigError  # noqa: E402
from samoe_dist.export.convert import ConversionError, export, import_plain, reshard  # noqa: E402
from samoe_dist.export.hf.convert import FORMATS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("reshard", help="weights-only checkpoint for another expert-/tensor-parallel size / world size")
    r.add_argument("--load", required=True, help="a run's --save directory, or one iter_* directory in it")
    r.add_argument("--save", required=True, help="new (or empty) directory for the weights-only checkpoint")
    r.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="EP size of the run that will load it; must divide --num-experts (default 1)")
    r.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size of the run that will load it; must divide the heads, FFN and vocabulary (default 1)")
    r.add_argument("--world-size", type=int, default=None,
                   help="processes of the run that will load it; a multiple of the EP and TP sizes (default: the "
                        "larger of them)")
    e = sub.add_parser("export", help="plain PyTorch model files (samoe_dist/export/plain_gpt.py)")
    e.add_argument("--load", required=True, help="a run's --save directory, or one iter_* directory in it")
    e.add_argument("--output", required=True,
                   help="X.safetensors (the config goes to X.json), or a directory (model.safetensors, model.json)")
    e.add_argument("--overwrite", action="store_true", help="replace existing output files")
    i = sub.add_parser("import", help="a plain model back into a weights-only training checkpoint")
    i.add_argument("--input", required=True, help="X.safetensors with X.json next to it, or their directory")
    i.add_argument("--save", required=True, help="new (or empty) directory for the checkpoint")
    h = sub.add_parser("export-hf", help="a Hugging Face model folder (samoe's own code, or Mixtral)")
    h.add_argument("--load", required=True, help="a run's --save directory, or one iter_* directory in it")
    h.add_argument("--output", required=True, help="the folder to write")
    h.add_argument("--format", default="samoe", choices=FORMATS,
                   help="samoe: any model, loads with trust_remote_code=True (default); mixtral: transformers' own "
                        "MixtralForCausalLM, for a model with experts in every layer, RMSNorm, SwiGLU, RoPE and "
                        "--no-moe-router-pre-softmax (SaMoE experts materialised)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output folder")
    h.add_argument("--tokenizer-model", default=None, help="SentencePiece model (default: the one the run recorded)")
    h.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json (with --merge-file)")
    h.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt (with --vocab-file)")
    m = sub.add_parser("import-hf", help="a Hugging Face Mixtral folder into a weights-only standard-MoE checkpoint")
    m.add_argument("--input", required=True, help="the folder (config.json, model.safetensors)")
    m.add_argument("--save", required=True, help="new (or empty) directory for the checkpoint")
    c = sub.add_parser("compress", help="a standard-MoE checkpoint as a SaMoE one: k-means pool of P experts and "
                                        "simplex-fitted combinations; reports the reconstruction error per layer")
    c.add_argument("--load", required=True, help="a standard-MoE run's --save directory, or one iter_* directory")
    c.add_argument("--pool-size", type=int, required=True, help="P, from 1 to MoE layers x experts (that: exact)")
    c.add_argument("--save", required=True, help="new (or empty) directory for the weights-only SaMoE checkpoint")
    c.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --save")
    c.add_argument("--samoe-combination", default="softmax", choices=("softmax", "linear"),
                   help="softmax: logits tau*ln(weight) (default); linear: the weights themselves")
    c.add_argument("--samoe-temperature", type=float, default=1.0, help="tau of the softmax combinations (default 1)")
    c.add_argument("--min-weight", type=float, default=0.0,
                   help="floor on each softmax weight before the log, so every entry can still move in training "
                        "(default 0: zero weights stay exactly zero, and so get no gradient)")
    c.add_argument("--seed", type=int, default=0, help="k-means++ seed (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "reshard":
            tag = reshard(args.load, args.save, args.expert_model_parallel_size, args.world_size,
                          args.tensor_model_parallel_size)
            print(f"wrote {tag} (weights only): --load {args.save}")
        elif args.command == "export":
            weights, config = export(args.load, args.output, overwrite=args.overwrite)
            print(f"wrote {weights} and {config}")
        elif args.command == "import":
            tag = import_plain(args.input, args.save)
            print(f"wrote {tag} (weights only): --load {args.save}")
        elif args.command == "export-hf":
            from samoe_dist.export.hf.convert import export_hf

            out = export_hf(args.load, args.output, overwrite=args.overwrite, fmt=args.format,
                            tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                            merge_file=args.merge_file)
            print(f"wrote {out} ({args.format} format)")
        elif args.command == "compress":
            from samoe_dist.export.compress import compress

            tag, errors = compress(args.load, args.pool_size, args.save, overwrite=args.overwrite,
                                   mode=args.samoe_combination, temperature=args.samoe_temperature,
                                   min_weight=args.min_weight, seed=args.seed)
            print(f"wrote {tag} (weights only, SaMoE with a pool of {args.pool_size}): --load {args.save}")
            print("relative reconstruction error per MoE layer: " + ", ".join(f"{e:.6f}" for e in errors))
        else:
            from samoe_dist.export.hf.convert import import_hf

            tag = import_hf(args.input, args.save)
            print(f"wrote {tag} (weights only, standard MoE): --load {args.save}")
    except (ConversionError, ConfigError, FileNotFoundError, OSError) as exc:
        print(f"convert_checkpoint.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
