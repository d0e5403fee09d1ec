"""Peak resident memory per phase of an MC quantization run (a profiling aid for scripts/bench_scale.py --trace).

A background thread samples the process's resident set (/proc/self/statm) every few milliseconds and charges
each sample to the innermost phase open at that moment; phases are the pipeline's steps, wrapped at run time.
With a GPU, the peak of ``torch.cuda.max_memory_allocated`` is charged the same way (reset at each phase boundary).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Tracer:
    def __init__(self, interval: float = 0.005) -> None:
        self.stack: list[str] = ["startup"]
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []
        self.cuda_peaks: dict[str, int] = {}
        self._cuda_stack: list[int] = [0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self._thread.start()

    def _charge(self, rss: int) -> None:
        key = "/".join(self.stack)
        if key not in self.peaks:
            self.order.append(key)
            self.peaks[key] = 0
        self.peaks[key] = max(self.peaks[key], rss)

    def _sample(self, interval: float) -> None:
        while not self._stop.is_set():
            self._charge(_rss())
            time.sleep(interval)

    def _cuda_flush(self) -> None:
        """Charge the CUDA peak since the last boundary to the innermost phase; start a new interval."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_stack[-1] = max(self._cuda_stack[-1], torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str):
        self._cuda_flush()
        self.stack.append(name)
        self._cuda_stack.append(0)
        self._charge(_rss())
        try:
            yield
        finally:
            self._charge(_rss())
            self._cuda_flush()
            key, peak = "/".join(self.stack), self._cuda_stack.pop()
            self.cuda_peaks[key] = max(self.cuda_peaks.get(key, 0), peak)
            self._cuda_stack[-1] = max(self._cuda_stack[-1], peak)
            self.stack.pop()

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def wrapped(*a, **k):
            with self.phase(name or attr):
                return fn(*a, **k)

        setattr(owner, attr, wrapped)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        """Peak RSS per phase path, layer-indexed repeats folded into one line (their maximum)."""
        folded: dict[str, int] = {}
        for key in self.order:
            folded[key] = max(folded.get(key, 0), self.peaks[key])
        lines = ["peak RSS by phase (GiB):"]
        lines += [f"  {v / 2**30:6.3f}  {k}" for k, v in folded.items()]
        if any(self.cuda_peaks.values()):
            lines.append("peak CUDA memory allocated by phase (GiB):")
            lines += [f"  {self.cuda_peaks[k] / 2**30:6.3f}  {k}" for k in folded if k in self.cuda_peaks]
        return "\n".join(lines)


def trace_pipeline() -> Tracer:
    """Wrap the pipeline's steps so that each sample of the resident set is charged to the step running."""
    import optimum_mc.pipeline as pipeline
    import optimum_mc.pmq as pmq
    import optimum_mc.pruning as pruning
    import optimum_mc.results as results
    import optimum_mc.resume as resume
    from optimum_mc.calibration import layer_source, linear_gptq, stage

    t = Tracer()
    for attr in ("fetch", "calibrate", "quantize_layer"):
        t.wrap(pipeline.SequentialPipeline, attr)
    for attr in ("expert_candidates", "quantize_batch", "replace_experts"):
        t.wrap(pmq.PMQ, attr)
    t.wrap(linear_gptq.LinearGPTQ, "compress", "quantize_linears")
    t.wrap(resume.Resume, "rebuild", "rebuild_layer")
    t.wrap(results.MCResults, "store")
    from optimum_mc.calibration import capture, expert_gptq
    from optimum_mc.nn import linear

    t.wrap(pipeline, "capture_layer_inputs")
    t.wrap(pipeline, "run_layer")
    t.wrap(pmq, "expert_losses")
    t.wrap(expert_gptq, "gptq_quantize_batched")
    t.wrap(expert_gptq, "input_hessian")
    t.wrap(expert_gptq, "mid_hessian")
    t.wrap(capture.ExpertTokens, "cat", "tokens.cat")
    t.wrap(linear, "pack")
    t.wrap(pipeline, "quantize_model")
    t.wrap(pruning, "calibrate_odp")
    t.wrap(stage.Stage, "save_layer", "stage.save_layer")
    t.wrap(stage.Stage, "commit", "stage.commit")
    t.wrap(layer_source.CheckpointLayers, "park_outside")
    t.wrap(layer_source.CheckpointLayers, "restore_outside")
    return t
