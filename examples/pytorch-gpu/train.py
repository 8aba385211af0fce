"""Fits a small network to a made-up regression on the GPU the job was granted and writes the
model and its loss curve under /out. Falls back to the CPU, saying so, when no GPU is visible."""

import argparse
import json

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
steps = parser.parse_args().steps

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    print(f"GPU: {torch.cuda.get_device_name(0)}")
else:
    print("no GPU visible; training on the CPU")

torch.manual_seed(0)
x = torch.randn(4096, 64, device=device)
y = x @ torch.randn(64, 1, device=device) + 0.1 * torch.randn(4096, 1, device=device)
model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)).to(device)
optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
losses = []
for step in range(steps):
    optimiser.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimiser.step()
    losses.append(loss.item())
    if step % 50 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

torch.save(model.state_dict(), "/out/model.pt")
with open("/out/losses.json", "w") as f:
    json.dump(losses, f)
print(f"final loss {losses[-1]:.4f}")
