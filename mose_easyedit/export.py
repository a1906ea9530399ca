"""``mose-export-model DIR``: write the embedded SmolLM2-135M-Instruct as a Hugging Face folder EasyEdit can load.

EasyEdit's ``BaseEditor`` picks the model class from ``hparams.model_name`` by substring (``llama``, ``qwen``,
``gpt``, ...), so the folder's name must contain ``llama`` (SmolLM2 is a LLaMA-architecture model); the default
name does. The shipped ``hparams/MOSE/smollm2-135m-easyedit.yaml`` points at ``./smollm2-135m-llama``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_EXPORT = "smollm2-135m-llama"


def export_default_model(directory: str | os.PathLike = DEFAULT_EXPORT, overwrite: bool = False) -> Path:
    """Save the embedded model (float32) and its tokenizer to ``directory``; returns its path.

    Raises ``ValueError`` if the folder's name lacks ``llama`` (EasyEdit would not know the model family) and
    ``FileExistsError`` if it exists and holds files, unless ``overwrite``. The folder appears whole or not at all.
    """
    from .modeling import load_default_model, save_folder_atomically

    target = Path(directory).expanduser().resolve()
    if "llama" not in target.name.lower():
        raise ValueError(f"{target.name!r}: EasyEdit chooses the model class from the folder's name, which must "
                         f"contain 'llama' for this model (e.g. {target.name}-llama)")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass --overwrite to replace it)")
    model, tok = load_default_model()
    if target.exists():
        shutil.rmtree(target)
    save_folder_atomically(target, lambda folder: (model.save_pretrained(folder), tok.save_pretrained(folder)))
    logger.info("wrote %s (SmolLM2-135M-Instruct, float32); use model_name: %s in an EasyEdit YAML", target, target)
    return target


def main(argv=None) -> int:
    from .logs import setup_logging

    parser = argparse.ArgumentParser(prog="mose-export-model", description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default=DEFAULT_EXPORT,
                        help=f"folder to write (its name must contain 'llama'; default {DEFAULT_EXPORT})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        export_default_model(args.directory, args.overwrite)
    except (ValueError, FileExistsError) as exc:
        logging.getLogger("mose_easyedit").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
