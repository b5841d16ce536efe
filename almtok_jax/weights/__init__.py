"""The weights layer: from a released PyTorch checkpoint to a model directory and back into memory.

:mod:`.torch_io` reads ``torch.save`` zips and ``.safetensors`` without executing code; :mod:`.release` reads a
release folder (local or from the hub); :mod:`.convert` derives the architecture and converts the weights
(each component's own rules); :mod:`.model_dir` writes, reads and checks model directories."""
