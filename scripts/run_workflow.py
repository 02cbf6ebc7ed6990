"""Run a shipped workflow through a headless ComfyUI server and write its PNG.

With the user's real weights: they must be in the ComfyUI's model folders (or --base-directory's).
With --random-weights: the same workflow runs on generated random weights in the real file layouts
(scaled down), as a smoke test of the whole path; the picture is noise.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zimage_nodes.testing.comfy import ComfyServer, comfy_root  # noqa: E402

NEEDED = {  # loader input -> (ComfyUI model folder, file users have)
    "dit_name": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
    "text_encoder_name": ("text_encoders", "qwen_3_4b.safetensors"),
    "vae_name": ("vae", "ae.safetensors"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=str(REPO / "workflows" / "api" / "z_image_turbo_t2i.json"))
    ap.add_argument("--random-weights", action="store_true",
                    help="run on generated random weights (scaled down) instead of the real files")
    ap.add_argument("--base-directory", help="a ComfyUI base directory holding models/ (default: the ComfyUI tree)")
    ap.add_argument("--prompt", help="replace the prompt text")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--out", default="zimage_output.png", help="where to copy the PNG")
    args = ap.parse_args()

    prompt = json.loads(Path(args.workflow).read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "ZImageTextEncode" and args.prompt is not None:
            inputs["text"] = args.prompt
        if node["class_type"] == "ZImageSampler":
            for key in ("width", "height", "seed"):
                if getattr(args, key) is not None:
                    inputs[key] = getattr(args, key)

    tmp = Path(tempfile.mkdtemp(prefix="zimage_run_"))
    if args.random_weights:
        from zimage_nodes.testing import weights
        print("[zimage] writing random-weight checkpoints (scaled down, real layouts) ...", flush=True)
        weights.write_all(tmp / "base" / "models", scale="tiny",
                          tokenizer_src=comfy_root() / "comfy" / "text_encoders" / "qwen25_tokenizer",
                          layouts=("single",))
        base, models = tmp / "base", None
    else:
        base_models = Path(args.base_directory) / "models" if args.base_directory else comfy_root() / "models"
        missing = [f"  {base_models / folder / name}   (input {inp})" for inp, (folder, name) in NEEDED.items()
                   if not (base_models / folder / name).is_file()]
        if missing:
            print("[zimage] The Z-Image-Turbo weights are not in the ComfyUI model folders. Put these files there:\n"
                  + "\n".join(missing)
                  + "\n(from Comfy-Org/z_image_turbo: split_files/diffusion_models, split_files/text_encoders, "
                    "split_files/vae), or run the same workflow on random weights as a smoke test:\n"
                    "  ./zimage run --random-weights", file=sys.stderr)
            return 2
        base, models = tmp / "base", base_models
    server = ComfyServer(base, models_dir=models)
    try:
        print(f"[zimage] ComfyUI {server.url} running {Path(args.workflow).name} ...", flush=True)
        entry, messages = server.run(prompt, timeout=1800)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m["data"] for m in messages if m.get("type") == "execution_error"]
            msg = errors[0].get("exception_message", "") if errors else json.dumps(status)[:2000]
            print(f"[zimage] The workflow failed:\n{msg}", file=sys.stderr)
            return 1
        images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
        if not images:
            print("[zimage] The workflow produced no image.", file=sys.stderr)
            return 1
        img = images[0]
        src = base / "output" / img.get("subfolder", "") / img["filename"]
        shutil.copyfile(src, args.out)
        print(f"[zimage] wrote {args.out}" + (" (random weights: the picture is noise)" if args.random_weights else ""))
        return 0
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
