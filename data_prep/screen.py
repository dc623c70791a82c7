"""Screen candidate data sets: how well does a small GRU learn them, and how fast?

A plain torch script (``torch.nn.GRU`` or a Python-loop implicit GRU, last
hidden state -> linear head, Adam, cross-entropy), independent of the
package's trainer, used to choose the bundled default data set::

    python -m data_prep.screen FILE_OR_NAME [...] --epochs 5 --hidden 32 --lr 3e-3

Prints one line per epoch: train loss, test accuracy, cumulative seconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mgrit_gru.data import iterate_minibatches, load_dataset


class ImplicitGRU(torch.nn.Module):
    """Implicit GRU, dt = 1: gates from h_{t-1}, h_t = (h + (1 - z) n) / (1 + (1 - z))."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.cell = torch.nn.GRUCell(input_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cell
        hs = c.hidden_size
        xw = x @ c.weight_ih.T + c.bias_ih                    # [B, T, 3H]
        h = x.new_zeros(x.shape[0], hs)
        for t in range(x.shape[1]):
            hw = h @ c.weight_hh.T + c.bias_hh
            r = torch.sigmoid(xw[:, t, :hs] + hw[:, :hs])
            z = torch.sigmoid(xw[:, t, hs:2 * hs] + hw[:, hs:2 * hs])
            n = torch.tanh(xw[:, t, 2 * hs:] + r * hw[:, 2 * hs:])
            a = 1 - z
            h = (h + a * n) / (1 + a)
        return h


class Classifier(torch.nn.Module):
    def __init__(self, input_size: int, hidden: int, classes: int, cell: str):
        super().__init__()
        self.implicit = cell == "implicit"
        self.rnn = (ImplicitGRU(input_size, hidden) if self.implicit
                    else torch.nn.GRU(input_size, hidden, batch_first=True))
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.rnn(x) if self.implicit else self.rnn(x)[1][0]
        return self.head(h)


def screen(name: str, args: argparse.Namespace) -> None:
    ds = load_dataset(name, max_train=args.max_train, max_test=args.max_test)
    if ds.train.lengths is not None:
        raise SystemExit(f"{name}: variable-length sets are not supported by this screening script")
    torch.manual_seed(args.seed)
    model = Classifier(ds.input_size, args.hidden, ds.num_classes, args.cell)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = np.random.default_rng(args.seed)
    xte = torch.from_numpy(ds.test.x)
    yte = torch.from_numpy(ds.test.y)
    chance = np.bincount(ds.test.y).max() / len(ds.test)
    print(f"{ds.name}: {len(ds.train)} train / {len(ds.test)} test, T={ds.seq_len}, "
          f"{ds.num_classes} classes, majority-class test acc {chance:.3f}, cell {args.cell}")
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        losses = []
        for xb, yb, _ in iterate_minibatches(ds.train, args.batch, shuffle=True, generator=gen):
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            acc = sum((model(xte[i:i + 256]).argmax(1) == yte[i:i + 256]).sum().item()
                      for i in range(0, len(yte), 256)) / len(yte)
        print(f"  epoch {epoch:2d}  loss {np.mean(losses):.4f}  test acc {acc:.3f}  "
              f"{time.perf_counter() - t0:6.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.screen", description=__doc__.split("\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--cell", choices=("gru", "implicit"), default="gru")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--max-test", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        screen(name, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
