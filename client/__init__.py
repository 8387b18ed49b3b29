"""The torch.compile backend: capture, RPC client, plan executor and in-process fallback."""
