"""The peer quantizers' own virtual environments, created by the bench on first use.

No peer is a trtq dependency: each lives in ``bench/envs/<peer>/`` (gitignored), made with
``python -m venv`` and pip with pinned versions the first time the bench needs it, and runs
only as a subprocess (``bench/peers/<peer>_runner.py``). A peer that cannot be installed (no
wheel, no network) is reported as such in the table; the bench goes on with the others.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ENVS = BENCH / "envs"
RUNNERS = BENCH / "peers"


@dataclass(frozen=True)
class Peer:
    name: str
    title: str
    requirements: tuple[str, ...]
    methods: tuple[str, ...]  # passed as --method; the first is the default setting


PEERS = {
    "ort": Peer(
        "ort",
        "onnxruntime quantize_static",
        ("onnxruntime==1.32.0", "onnx==1.23.2", "numpy==2.4.6"),
        ("MinMax", "Percentile"),
    ),
    "nncf": Peer(
        "nncf",
        "Intel NNCF",
        ("nncf==3.4.0", "onnxruntime==1.32.0", "onnx==1.23.2", "numpy==2.4.6"),
        ("default",),
    ),
    # The CPU torch wheel is pinned, or pip pulls CUDA torch and gigabytes of nvidia wheels.
    "modelopt": Peer(
        "modelopt",
        "NVIDIA ModelOpt",
        (
            "torch==2.13.0+cpu",
            "nvidia-modelopt[onnx]==0.47.0",
            "onnxruntime==1.32.0",
            "numpy==2.4.6",
        ),
        ("max", "entropy"),
    ),
}


def peer_python(peer: Peer, log: Path) -> tuple[Path | None, str]:
    """The peer's interpreter, creating its environment if needed; (None, why) if it cannot.

    An environment counts as ready once its stamp (the pinned requirements) matches, so a
    failed or interrupted install is retried on the next run.
    """
    env = ENVS / peer.name
    python = env / "bin" / "python"
    stamp = env / ".requirements"
    wanted = "\n".join(peer.requirements)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python, ""
    with open(log, "ab") as out:
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(env)],
            [str(python), "-m", "pip", "install", "--quiet", *peer.requirements],
        ]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                return None, f"could not install {' '.join(peer.requirements)} (see {log})"
    stamp.write_text(wanted)
    return python, ""


def runner_command(
    python: Path,
    peer: Peer,
    model: Path,
    calib: Path,
    output: Path,
    stats: Path,
    method: str,
    transformer: bool,
) -> list[str]:
    """The command that quantizes ``model`` with ``peer`` in its own environment."""
    command = [str(python), str(RUNNERS / f"{peer.name}_runner.py")]
    command += [str(model), str(calib), str(output), str(stats), "--method", method]
    return command + (["--transformer"] if transformer else [])
