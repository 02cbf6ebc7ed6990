"""ZImageVRAMMonitor: a pass-through node that reports memory per node of the running prompt."""
from __future__ import annotations

from .. import comfy_bridge as bridge
from .. import ids, monitor


class AnyType(str):
    """A socket type equal to every other: ComfyUI validates links with ``received != expected``
    (comfy_execution/validation.py honours a ``__ne__`` override), and the frontend treats "*" as a
    wildcard. Core's own V3 ``io.AnyType`` is the same "*" with the same comparison."""

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = str.__hash__


ANY = AnyType("*")


class ZImageVRAMMonitor:
    DESCRIPTION = ("Passes its input through unchanged (any type) and reports memory for the prompt being run: "
                   "each node that finished BEFORE this monitor with its time and exact peak of PyTorch "
                   "allocated VRAM, device-wide VRAM use (NVML), host RAM, and a plot of memory over time "
                   "with the node spans. Put it last: connect its input to the final output (e.g. the "
                   "sampler's image) so every node runs before it; nodes after it are not in its report. "
                   "Without CUDA it reports host memory. Measuring costs well under 1% of sampling time.")
    CATEGORY = ids.CAT_MEMORY
    RETURN_TYPES = (ANY, "STRING", "IMAGE")
    RETURN_NAMES = ("value", "report", "plot")
    OUTPUT_TOOLTIPS = ("The input, unchanged (the same object).",
                       "Per-node times and peaks of this prompt up to this monitor, memory now, and the policy's "
                       "predicted peak against the measured one.",
                       "Memory over the prompt's time: node spans shaded, each node's peak marked, the budget "
                       "line when a policy is connected, predicted vs measured peak on the right.")
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "plot_width": ("INT", {"default": 1024, "min": 320, "max": 4096, "step": 8,
                                       "tooltip": "Width of the plot image in pixels."}),
                "plot_height": ("INT", {"default": 512, "min": 200, "max": 4096, "step": 8,
                                        "tooltip": "Height of the plot image in pixels."}),
            },
            "optional": {
                "value": (ANY, {"tooltip": "Anything (IMAGE, LATENT, ZIMAGE_MODEL, ...): passed through unchanged. "
                                           "Connect the final output here so the monitor runs after every "
                                           "node it should measure."}),
                "policy": (ids.T_POLICY, {"tooltip": "Optional Z-Image memory policy: its budget is drawn as a "
                                                     "line and its predicted peak is compared with the measured "
                                                     "one."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        # ComfyUI calls this when a prompt starts, right after it creates the prompt's progress registry:
        # hook the recorder there. The constant result keeps normal caching (the monitor re-runs when
        # its inputs do).
        try:
            monitor.arm()
        except Exception as e:  # measuring must never stop the prompt; the node says what is missing
            bridge.warn(f"VRAM monitor could not hook this prompt: {type(e).__name__}: {e}")
        return ""

    def report(self, plot_width, plot_height, value=None, policy=None, unique_id=None):
        text, plot = monitor.collect(unique_id, policy, plot_width, plot_height)
        return {"ui": {"text": [text]}, "result": (value, text, plot)}
