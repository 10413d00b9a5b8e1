"""Where the fresh2 identity failures differ (a diagnosis, not a fix): eager vs the captured program vs the
zero-reduction transform, and the captured program called twice.

  python bench/unseen_fresh2_diag.py [--write] minicpm_ocr qwen4_exp

``--write`` keeps each printed line in docs/results/unseen.json (fresh2 -> diagnosis, keyed by family and commit;
the lines of other commits stay) and renders the section.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import graphred  # noqa: E402
import unseen_families as u  # noqa: E402
from graphred import zoo  # noqa: E402
from graphred.plans import pumer  # noqa: E402


def logits(out):
    return out.logits if hasattr(out, "logits") else out


def main() -> None:
    torch.set_num_threads(1)
    write = "--write" in sys.argv
    lines = {}
    for name in [a for a in sys.argv[1:] if a != "--write"]:
        with zoo._quiet_transformers(), zoo._seeded(0):
            model, kw = u.BUILDERS[name]()
        model.eval()
        with torch.no_grad():
            a, a2 = model(**kw).logits, model(**kw).logits
            prog = graphred.capture(model, **kw)
            p, p2 = logits(prog(**kw)), logits(prog(**kw))
            z = logits(graphred.transform(prog, pumer(prune=0, merge=0))(**kw))
        d = lambda x, y: f"{(x - y).abs().max().item():.3g}"  # noqa: E731
        key = f"{name} at {u.subprocess_commit()}"
        lines[key] = (f"{key}: logit scale {a.abs().max().item():.3g}; eager twice {d(a, a2)}; captured vs eager "
                      f"{d(p, a)}; captured twice {d(p, p2)}; zero reduction vs eager {d(z, a)}, vs captured {d(z, p)}")
        print(lines[key], flush=True)
    if write:
        data = json.loads(u.RESULTS.read_text())
        data["fresh2"].setdefault("diagnosis", {}).update(lines)
        u.RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        u.write_section(u.render(data), u.MARK)


if __name__ == "__main__":
    main()
