"""Generate the README's node reference from the node classes themselves, so it stays true.

    .venv/bin/python scripts/node_docs.py          # rewrite the section between the markers in README.md
    .venv/bin/python scripts/node_docs.py --check  # exit 1 if README.md is out of date (a test runs this)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
START, END = "<!-- nodes:start -->", "<!-- nodes:end -->"


def _default(spec) -> str:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        shown = ", ".join(f"`{v}`" for v in kind[:8]) + (" ..." if len(kind) > 8 else "")
        d = opts.get("default", kind[0] if kind else "")
        return f"one of {shown}; default `{d}`" if kind else "a file from the model folder"
    if "default" in opts:
        rng = f" ({opts['min']}..{opts['max']})" if "min" in opts and "max" in opts else ""
        return f"`{opts['default']!r}`{rng}".replace("'", "")
    return ""


def render() -> str:
    from zimage_nodes.testing.comfy import ensure_comfy_importable
    ensure_comfy_importable(Path(tempfile.mkdtemp(prefix="zimage_docs_")))
    from zimage_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    out = []
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        out += [f"### {NODE_DISPLAY_NAME_MAPPINGS[node_id]} (`{node_id}`, category `{cls.CATEGORY}`)", "",
                cls.DESCRIPTION, "", "| input | type | default / choices | what it does |", "|---|---|---|---|"]
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, s in spec.get(section, {}).items():
                kind = "combo" if isinstance(s[0], list) else s[0]
                tip = (s[1] if len(s) > 1 else {}).get("tooltip", "")
                opt = " (optional)" if section == "optional" else ""
                if name.endswith("_name") or name == "diffusers_folder":
                    default = "the files in ComfyUI's model folder"
                elif name.endswith("_device"):
                    default = "`auto`, `cpu`, `cuda:N` of this machine; default `auto`"
                else:
                    default = _default(s)
                out.append(f"| `{name}`{opt} | {kind} | {default} | {tip} |")
        outs = ", ".join(f"`{n}` ({t}): {tip}" for n, t, tip in
                         zip(cls.RETURN_NAMES, cls.RETURN_TYPES, getattr(cls, "OUTPUT_TOOLTIPS", [""] * 9)))
        out += ["", f"Outputs: {outs}", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}{END}{tail}"
    if args.check:
        if new != text:
            print("README.md's node reference is out of date: run .venv/bin/python scripts/node_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
