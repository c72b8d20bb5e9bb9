"""Every flow of the documentation, offline, in a few minutes: ``python -m anomalib_anomalyclip.testing.walkthrough``.

Makes a tiny random CLIP and generated datasets (no network, no real weights), then runs each flow with the real
commands, printing each one as a user would type it (from the walkthrough's folder) before its output:

1. the tiny CLIP and two generated datasets: auxiliary categories to learn prompts on, and a target category;
2. prompt training on the auxiliary categories (``anomalib fit``), and the learned prompts kept as a file;
3. zero-shot evaluation of the target (``anomalib test``);
4. few-shot (``anomalib train --model.k_shot 2``), then ``predict`` with only its checkpoint;
5. mutual scoring and tiled inference (``anomalib test``);
6. export (Torch, the quickest to make), and ``predict`` with the exported file;
7. a benchmark with ``configs/benchmark/tiny_offline.yaml`` (from a source checkout).

The numbers mean nothing (a random CLIP); the runs show what each command does and writes. ``--work-dir`` chooses
the folder (default ``./anomalyclip_walkthrough``; it is reused, and its generated data replaced).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["Walkthrough", "main"]

CHECKPOINT_LINE = "Checkpoint written to "
ENV_SETTING = re.compile(r"[A-Z_][A-Z0-9_]*=\S*")
BENCHMARK_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "benchmark" / "tiny_offline.yaml"
MODEL = ("--model", "AnomalyCLIP", "--model.pretrained", "clip.pt", "--model.image_size", "56")
TARGET = ("--data", "MVTecAD", "--data.root", "data", "--data.category", "gamma", "--data.num_workers", "0")
PROMPTS = ("--model.prompt_weights", "prompts.ckpt")


class WalkthroughError(RuntimeError):
    """A step of the walkthrough failed; the message names the command."""


class Walkthrough:
    """Runs the documented commands in ``folder``, printing each as typed there.

    Args:
        folder: where the files go (the commands run there).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run(self, *command: str) -> list[str]:
        """Print ``command``, run it in the folder, print its output; the output's lines.

        Leading ``NAME=value`` items set environment variables, as in a shell.

        Raises:
            WalkthroughError: the command failed.
        """
        count = next(index for index, part in enumerate(command) if not ENV_SETTING.fullmatch(part))
        settings = dict(part.split("=", 1) for part in command[:count])
        program, *arguments = command[count:]
        print(f"\n$ {' '.join([*command[:count], shlex.join(command[count:])])}", flush=True)
        executable = shutil.which(program, path=str(Path(sys.executable).parent)) or program
        if program == "python":
            executable = sys.executable
        result = subprocess.run(
            [executable, *arguments],
            cwd=self.folder,
            env={**os.environ, **settings},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        output = result.stdout.rstrip()
        if output:
            print(output, flush=True)
        if result.returncode != 0:
            msg = f"the walkthrough stopped: `{shlex.join(command)}` exited with status {result.returncode}"
            raise WalkthroughError(msg)
        return output.splitlines()

    def copy(self, source: str, destination: str) -> None:
        """Print and do ``cp source destination`` in the folder."""
        print(f"\n$ cp {shlex.quote(source)} {shlex.quote(destination)}", flush=True)
        shutil.copyfile(self.folder / source, self.folder / destination)

    def checkpoint(self, lines: Sequence[str]) -> str:
        """The checkpoint that ``fit``/``train`` said it wrote, relative to the folder."""
        written = [line.split(CHECKPOINT_LINE, 1)[1].strip() for line in lines if CHECKPOINT_LINE in line]
        if not written:
            raise WalkthroughError("the run did not say where it wrote its checkpoint")
        path = Path(written[-1])
        return str(path.relative_to(self.folder.resolve())) if path.is_relative_to(self.folder.resolve()) else str(path)

    def all_flows(self) -> None:
        """Run every flow of the documentation, in the order of the README."""
        self.make_clip_and_data()
        self.learn_prompts()
        self.run("anomalib", "test", *MODEL, *PROMPTS, *TARGET)
        few_shot = self.checkpoint(self.run("anomalib", "train", *MODEL, *PROMPTS, "--model.k_shot", "2", *TARGET))
        self.run("anomalib", "predict", "--model", "AnomalyCLIP", "--ckpt_path", few_shot, "--data", "data/gamma/test")
        self.run("anomalib", "test", *MODEL, *PROMPTS, "--model.mutual", "true", *TARGET)
        tiling = ("--model.tiling", "true", "--model.tiling.working_size", "112")
        self.run("anomalib", "test", *MODEL, *PROMPTS, *tiling, *TARGET)
        self.export_and_predict(few_shot)
        self.benchmark()

    def make_clip_and_data(self) -> None:
        """The tiny CLIP, auxiliary categories (``aux``) and a target category (``data/gamma``)."""
        self.run("python", "-m", "anomalib_anomalyclip.testing.tiny_clip", "clip.pt", "--format", "openai")
        data = (
            "--image-size",
            "64",
            "--n-train-good",
            "4",
            "--n-test-good",
            "4",
            "--n-test-defect",
            "1",
            "--overwrite",
        )
        self.run("python", "-m", "anomalib_anomalyclip.testing.toy_data", "aux", "--categories", "alpha", "beta", *data)
        self.run("python", "-m", "anomalib_anomalyclip.testing.toy_data", "data", "--categories", "gamma", *data)

    def learn_prompts(self) -> None:
        """Prompt training on the auxiliary categories; the learned prompts kept as ``prompts.ckpt``."""
        aux = (
            "--data",
            "anomalib_anomalyclip.data.AuxiliaryDataModule",
            "--data.root",
            "aux",
            "--data.num_workers",
            "0",
        )
        lines = self.run("anomalib", "fit", *MODEL, "--model.training.epochs", "2", *aux)
        self.copy(self.checkpoint(lines), "prompts.ckpt")

    def export_and_predict(self, checkpoint: str) -> None:
        """Export the few-shot checkpoint and score the target's images with the exported file.

        The export is Torch's, the quickest to make; ``--export_type openvino`` (or ``onnx``) works the same, with
        ``exported/weights/openvino/model.xml``.
        """
        self.run("anomalib", "export", "--model", "AnomalyCLIP", "--ckpt_path", checkpoint, "--export_type",
                 "torch", "--default_root_dir", "exported")  # fmt: skip
        exported = ("--model.path", "exported/weights/torch/model.pt")
        trust = (
            "TRUST_REMOTE_CODE=1"  # a Torch export is a pickle: anomalib loads it only when told the file is trusted
        )
        self.run(trust, "anomalib", "predict", "--model", "ExportedAnomalyCLIP", *exported, "--data", "data/gamma/test")

    def benchmark(self) -> None:
        """The tiny benchmark configuration of the source checkout (skipped where it is not there)."""
        if not BENCHMARK_CONFIG.is_file():
            print(f"\n(no {BENCHMARK_CONFIG.name} here: the benchmark step needs a source checkout)")
            return
        relative = Path(os.path.relpath(BENCHMARK_CONFIG, self.folder.resolve()))
        config = relative if relative.parts[:2] != ("..", "..") else BENCHMARK_CONFIG
        self.run("anomalyclip-benchmark", "--config", config.as_posix())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the walkthrough; exit status 0 when every step worked, 1 when one failed."""
    parser = argparse.ArgumentParser(prog="python -m anomalib_anomalyclip.testing.walkthrough", description=__doc__)
    parser.add_argument("--work-dir", type=Path, default=Path("anomalyclip_walkthrough"), help="where files go")
    args = parser.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"$ cd {shlex.quote(str(args.work_dir))}", flush=True)
    try:
        Walkthrough(args.work_dir).all_flows()
    except WalkthroughError as error:
        print(f"\nERROR: {error}", file=sys.stderr)
        return 1
    print(f"\nEvery flow ran; the files are in {args.work_dir}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
