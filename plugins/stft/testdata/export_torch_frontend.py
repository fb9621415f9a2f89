"""Writes torch_logmel.onnx: a log-mel front end exported by PyTorch's own ONNX exporter.

The STFT node in it is exactly what ``torch.onnx.export`` writes for ``torch.stft`` at opset 17
(frame_step and frame_length as Constant nodes, the Hann window as an initializer, the
signal reshaped to [batch, samples, 1] after center padding), which the graph pass must
handle. trtq itself does not need torch; this script is how the file was made:

    python -m venv /tmp/t && /tmp/t/bin/pip install torch==2.13.0 onnx numpy
    /tmp/t/bin/python plugins/stft/testdata/export_torch_frontend.py
"""

from pathlib import Path

import numpy as np
import torch

RATE, N_FFT, HOP, MELS = 16000, 400, 160, 40


def mel_filterbank(bins: int, mels: int, rate: int) -> np.ndarray:
    """[bins, mels] triangular filters evenly spaced on the HTK mel scale."""
    mel = np.linspace(0, 2595 * np.log10(1 + rate / 2 / 700), mels + 2)
    edges = 700 * (10 ** (mel / 2595) - 1)
    freqs = np.linspace(0, rate / 2, bins)
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - left) / (centre - left)
    falling = (right - freqs) / (right - centre)
    return np.maximum(0, np.minimum(rising, falling)).T.astype(np.float32)


class LogMel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT))
        self.register_buffer("mel", torch.from_numpy(mel_filterbank(N_FFT // 2 + 1, MELS, RATE)))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            audio,
            n_fft=N_FFT,
            hop_length=HOP,
            window=self.window,
            center=True,
            onesided=True,
            return_complex=False,
        )  # [batch, bins, frames, 2]
        power = spec.pow(2).sum(-1).transpose(1, 2)  # [batch, frames, bins]
        return torch.log(power @ self.mel + 1e-6)


if __name__ == "__main__":
    torch.onnx.export(
        LogMel().eval(),
        (torch.randn(2, RATE),),
        str(Path(__file__).with_name("torch_logmel.onnx")),
        opset_version=17,
        input_names=["audio"],
        output_names=["logmel"],
        dynamic_axes={"audio": {0: "batch", 1: "samples"}, "logmel": {0: "batch", 1: "frames"}},
        dynamo=False,
    )
