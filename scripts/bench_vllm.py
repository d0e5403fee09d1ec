"""Serving MC checkpoints with vLLM: quality against transformers, TP/EP, load, speed (writes JSON).

Run with the Python that has vLLM (the CPU build: docs/serving-vllm.md), from the repository root::

    python scripts/bench_vllm.py --work-dir /tmp/bench-vllm --parts quality,tp,load,speed --out vllm.json

Parts (each bounded: a few windows / prompts / rounds, engines in subprocesses with timeouts):

- ``quality``: ../shared/models/mc-ref-mixtral quantized with MC (cached under --work-dir); perplexity from vLLM's
  prompt logprobs vs transformers' on the same 256-token windows of ../shared/data/dev.*.txt, the same dtype, for
  the float and the MC model; greedy 32-token completions of 16 prompts compared token by token; ODP (vLLM: the
  first-N-positions protection; transformers: attention-importance protection, and none) perplexity and skipped share.
- ``tp``: the MC model's perplexity with tensor parallel 2 and expert parallel 2 vs 1 rank.
- ``load``: an OpenAI server on the MC model: 64 concurrent streamed requests, a malformed request (4xx), health.
- ``speed``: a random-weight Mixtral of 1/4 width (hidden 1024, intermediate 3584, 8 experts top-2, 4 layers) in bf16
  and quantized with MC (random allocation at 2.5 bits, calibration-free experts: the allocation's cost does not
  matter here), served side by side (eager mode) and measured in interleaved rounds: output tokens/s at concurrency
  1 and 16, time to first token of a 512-token prompt; MC with ODP on vs off at concurrency 1.

vLLM is imported only by the engine subprocesses (this file, run with ``--engine-job``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
REF_MODEL = SHARED / "models" / "mc-ref-mixtral"
WINDOW = 256
ENGINE_TIMEOUT = 900


def log(msg: str) -> None:
    print(f"[bench_vllm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- engine subprocess (offline LLM) ---


def engine_job(spec_path: str) -> None:
    """Run one offline vLLM engine as ``spec`` says; write prompt logprob sums, greedy tokens and ODP stats."""
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("in_process"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec.get("max_model_len", 512),
              gpu_memory_utilization=0.25, enforce_eager=True, **spec.get("extra", {}))  # fmt: skip
    out: dict = {}
    if spec.get("in_process"):
        from optimum_mc.integrations.vllm.odp import reset_odp_stats

        reset_odp_stats()
    if spec.get("windows"):
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        res = llm.generate([{"prompt_token_ids": w} for w in spec["windows"]], params, use_tqdm=False)
        nll = []
        for w, r in zip(spec["windows"], res):
            nll.append(-sum(d[t].logprob for t, d in zip(w[1:], r.prompt_logprobs[1:])))
        out["nll"] = nll
    if spec.get("prompts"):
        params = SamplingParams(max_tokens=spec.get("new_tokens", 32), temperature=0, ignore_eos=True)
        res = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
        out["greedy"] = [list(r.outputs[0].token_ids) for r in res]
    if spec.get("in_process"):
        from optimum_mc.integrations.vllm.odp import odp_stats

        out["odp"] = odp_stats()
    Path(spec["out"]).write_text(json.dumps(out))


def run_engine(work: Path, name: str, spec: dict, env: dict | None = None) -> dict:
    spec = {**spec, "out": str(work / f"{name}.out.json")}
    path = work / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, "--engine-job", str(path)], capture_output=True, text=True,
                          timeout=ENGINE_TIMEOUT, env={**os.environ, **(env or {})})  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"engine {name} failed:\n{proc.stderr[-3000:]}")
    log(f"engine {name}: {time.monotonic() - t0:.0f} s (load {load_avg()})")
    return json.loads(Path(spec["out"]).read_text())


# --- data ---


def windows(tokenizer, count: int) -> list[list[int]]:
    """``count`` windows of WINDOW tokens, spread over ../shared/data/dev.*.txt (round robin over the files)."""
    per_file = []
    for path in sorted((SHARED / "data").glob("dev.*.txt")):
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        per_file.append([ids[i : i + WINDOW] for i in range(0, len(ids) - WINDOW + 1, WINDOW)])
    out, k = [], 0
    while len(out) < count and any(k < len(f) for f in per_file):
        out += [f[k] for f in per_file if k < len(f)]
        k += 1
    return out[:count]


def ppl(nll: list[float], n_windows: int) -> float:
    return math.exp(sum(nll) / (n_windows * (WINDOW - 1)))


def hf_eval(model_dir: Path, dtype: str, wins, prompts, new_tokens: int, odp: dict | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_mc  # noqa: F401  (registers the MC quantizer)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    if odp is not None:
        optimum_mc.set_odp(model, True, **odp)
        optimum_mc.reset_odp_stats(model)
    nll = []
    with torch.no_grad():
        for w in wins:
            ids = torch.tensor([w])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            nll.append(-lp[torch.arange(len(w) - 1), ids[0, 1:]].sum().item())
        out = {"nll": nll}
        if odp is not None:
            out["skipped_share"] = optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"]
        if prompts:
            greedy = []
            for p in prompts:
                g = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
                greedy.append(g[0, len(p) :].tolist())
            out["greedy"] = greedy
    return out


def compare_greedy(a: list[list[int]], b: list[list[int]]) -> dict:
    first = []
    for x, y in zip(a, b):
        d = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        first.append(d)
    return {"equal": sum(d is None for d in first), "of": len(first), "first_divergence": first}


def mc_model(work: Path) -> Path:
    out = work / "mc-ref-mixtral-mc"
    if not (out / "config.json").exists():
        log("quantizing mc-ref-mixtral with MC (~2 min)")
        from optimum_mc.tools.cli import main

        if main(["--quiet", "quantize", str(REF_MODEL), "--output", str(out)]) != 0:
            raise RuntimeError("optimum-mc quantize failed")
    return out


# --- parts ---


def part_quality(work: Path, args) -> dict:
    from transformers import AutoTokenizer

    mc = mc_model(work)
    tok = AutoTokenizer.from_pretrained(REF_MODEL)
    wins = windows(tok, args.windows)
    prompts = [w[:24] for w in windows(tok, 64)[-args.prompts :]]  # other windows' starts than the scored ones
    res: dict = {"windows": len(wins), "window_tokens": WINDOW, "dtype": args.dtype, "prompts": len(prompts)}
    for name, path in (("float", REF_MODEL), ("mc", mc)):
        hf = hf_eval(path, args.dtype, wins, prompts, 32)
        vl = run_engine(work, f"quality-{name}", {"model": str(path), "dtype": args.dtype, "windows": wins,
                                                  "prompts": prompts, "new_tokens": 32})  # fmt: skip
        p_hf, p_vl = ppl(hf["nll"], len(wins)), ppl(vl["nll"], len(wins))
        res[name] = {"ppl_transformers": p_hf, "ppl_vllm": p_vl, "ratio": p_vl / p_hf,
                     "greedy": compare_greedy(vl["greedy"], hf["greedy"])}  # fmt: skip
        log(f"quality {name}: transformers {p_hf:.4f} vLLM {p_vl:.4f}")
    # ODP: vLLM's substitute protection (first N positions) vs transformers' attention-importance protection
    odp: dict = {}
    for label, kw in (("protect_attention_2pct", {"protect_ratio": 0.02}), ("no_protection", {"protect_ratio": 0.0})):
        hf = hf_eval(mc, args.dtype, wins, [], 0, odp=kw)
        odp[f"transformers_{label}"] = {"ppl": ppl(hf["nll"], len(wins)), "skipped_share": hf["skipped_share"]}
    for n in args.protect_first:
        over = {"hf_overrides": {"mc_odp": True, "mc_odp_protect_first": n}}
        spec = {"model": str(mc), "dtype": args.dtype, "windows": wins, "in_process": True, "extra": over}
        vl = run_engine(work, f"quality-odp-{n}", spec)
        share = vl["odp"]["skipped_share"]
        odp[f"vllm_protect_first_{n}"] = {"ppl": ppl(vl["nll"], len(wins)), "skipped_share": share}
    odp["mc_no_odp_ppl_vllm"] = res["mc"]["ppl_vllm"]
    res["odp"] = odp
    log(f"quality ODP: {json.dumps(odp)}")
    return res


def part_tp(work: Path, args) -> dict:
    from transformers import AutoTokenizer

    mc = mc_model(work)
    wins = windows(AutoTokenizer.from_pretrained(REF_MODEL), args.windows)
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")}
    res: dict = {"windows": len(wins), "dtype": args.dtype}
    for name, extra in (("tp1", {}), ("tp2", {"tensor_parallel_size": 2}),
                        ("ep2", {"tensor_parallel_size": 2, "enable_expert_parallel": True})):  # fmt: skip
        vl = run_engine(work, f"tp-{name}", {"model": str(mc), "dtype": args.dtype, "windows": wins, "extra": extra},
                        env if extra else None)  # fmt: skip
        res[name] = {"ppl": ppl(vl["nll"], len(wins))}
    for name in ("tp2", "ep2"):
        res[name]["ratio_vs_tp1"] = res[name]["ppl"] / res["tp1"]["ppl"]
    log(f"tp: {json.dumps(res)}")
    return res


# --- servers ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, name: str, work: Path, dtype: str, env: dict | None = None,
                 extra: list[str] | None = None, max_model_len: int = 1024) -> None:  # fmt: skip
        self.name, self.port = name, _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--max-model-len", str(max_model_len),
                "--enforce-eager", "--served-model-name", name] + (extra or [])  # fmt: skip
        self.log_path = work / f"server-{name}.log"
        self.log = open(self.log_path, "w")
        full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)  # fmt: skip

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait(self, timeout: float = ENGINE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {self.name} did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key="x", timeout=600, max_retries=0)

    def stop(self) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def stream(client, model: str, prompt, max_tokens: int) -> dict:
    """One streamed completion: time to first token, decode time after it, tokens."""
    t0 = time.perf_counter()
    first, n, text = None, 0, []
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    for c in chunks:
        if c.choices and c.choices[0].text:
            n += 1
            text.append(c.choices[0].text)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "decode_s": end - (first or end), "chunks": n, "total_s": end - t0,
            "text": "".join(text)}  # fmt: skip


def part_load(work: Path, args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import openai

    mc = mc_model(work)
    srv = Server(mc, "mc", work, args.dtype)
    try:
        srv.wait()
        client = srv.client()
        t0 = time.monotonic()
        with ThreadPoolExecutor(64) as pool:
            outs = list(pool.map(lambda i: stream(client, "mc", f"Request {i}: once upon a time", 16), range(64)))
        wall = time.monotonic() - t0
        complete = sum(o["chunks"] >= 1 for o in outs)
        status = None
        try:
            client.completions.create(model="mc", prompt="x", max_tokens=-5)
        except openai.APIStatusError as e:
            status = e.status_code
        after = client.completions.create(model="mc", prompt="The cat", max_tokens=4, temperature=0)
        res = {"concurrent": 64, "completed": complete, "wall_s": wall, "malformed_status": status,
               "healthy_after": srv.healthy() and srv.proc.poll() is None,
               "served_after": after.usage.completion_tokens == 4, "load": load_avg()}  # fmt: skip
    finally:
        srv.stop()
    log(f"load: {json.dumps(res)}")
    return res


SPEED_SHAPE = {"hidden_size": 1024, "intermediate_size": 3584, "num_local_experts": 8, "num_experts_per_tok": 2,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}  # fmt: skip


def speed_models(work: Path) -> tuple[Path, Path]:
    """A random Mixtral of 1/4 width in bf16 and its MC quantization (random allocation, no calibration)."""
    flt, mc = work / "speed-float", work / "speed-mc"
    if not (flt / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

        torch.manual_seed(0)
        cfg = MixtralConfig(vocab_size=4096, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0, **SPEED_SHAPE)  # fmt: skip
        model = MixtralForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(flt)
        AutoTokenizer.from_pretrained(REF_MODEL).save_pretrained(flt)
    if not (mc / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from optimum_mc import MCConfig

        log("quantizing the speed model with MC")
        qc = MCConfig(bits=2.5, allocation="random", min_expert_tokens=10**9, num_samples=4, seq_len=64,
                      group_size=128, show_progress=False)  # fmt: skip
        tok = AutoTokenizer.from_pretrained(flt)
        model = AutoModelForCausalLM.from_pretrained(flt, dtype=torch.bfloat16, quantization_config=qc)
        model.save_pretrained(mc)
        tok.save_pretrained(mc)
    return flt, mc


def part_speed(work: Path, args) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    flt, mc = speed_models(work)
    servers = {}
    if "float" in args.speed_servers:
        servers["float"] = Server(flt, "float", work, "bfloat16")
    servers["mc"] = Server(mc, "mc", work, "bfloat16")
    if "mc_odp" in args.speed_servers:
        servers["mc_odp"] = Server(mc, "mc_odp", work, "bfloat16", env={"OPTIMUM_MC_ODP_LOG_EVERY": "100"},
                                   extra=["--hf-overrides", '{"mc_odp": true}'])  # fmt: skip
    import random

    rng = random.Random(0)
    long_prompt = [rng.randrange(1, 4096) for _ in range(512)]
    short = [rng.randrange(1, 4096) for _ in range(16)]
    rows: dict = {k: {"c1_tok_s": [], "c16_tok_s": [], "ttft512_s": []} for k in servers}
    try:
        for s in servers.values():
            s.wait()
        clients = {k: s.client() for k, s in servers.items()}
        for k, c in clients.items():  # warm-up
            stream(c, k, short, 4)
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for k in order:
                c = clients[k]
                one = stream(c, k, short, args.new_tokens)
                rows[k]["c1_tok_s"].append((one["chunks"] - 1) / one["decode_s"])
                if args.c1_only:
                    continue
                t0 = time.perf_counter()
                reqs = [[(t + i) % 4096 for t in short] for i in range(16)]
                with ThreadPoolExecutor(16) as pool:
                    outs = list(pool.map(stream, [c] * 16, [k] * 16, reqs, [args.new_tokens] * 16))
                rows[k]["c16_tok_s"].append(sum(o["chunks"] for o in outs) / (time.perf_counter() - t0))
                if k != "mc_odp":  # ODP does not change prefill's cost much: not timed
                    rows[k]["ttft512_s"].append(stream(c, k, [(t + r) % 4096 for t in long_prompt], 1)["ttft"])
            log(f"speed round {r}: " + json.dumps({k: {m: v[-1] for m, v in d.items() if v} for k, d in rows.items()})
                + f" load {load_avg()}")  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
    med = {k: {m: statistics.median(v) for m, v in d.items() if v} for k, d in rows.items()}
    res = {"shape": SPEED_SHAPE, "rounds": args.rounds, "new_tokens": args.new_tokens, "per_round": rows,
           "median": med, "load_end": load_avg()}  # fmt: skip
    if "float" in med:
        res["mc_vs_float"] = {m: med["mc"][m] / med["float"][m] for m in med["float"] if m in med["mc"]}
    if "mc_odp" in med:
        res["odp_on_vs_off"] = {m: med["mc_odp"][m] / med["mc"][m] for m in med["mc_odp"]}
        # paired per round (the two servers measured back to back), robust to the machine's load drifting
        pairs = [a / b for a, b in zip(rows["mc_odp"]["c1_tok_s"], rows["mc"]["c1_tok_s"])]
        res["odp_on_vs_off_c1_paired"] = {"median": statistics.median(pairs), "per_round": pairs}
        logged = [ln for ln in servers["mc_odp"].log_path.read_text().splitlines() if "optimum-mc ODP" in ln]
        res["odp_server_log_last"] = logged[-1].split("optimum-mc ODP: ")[-1] if logged else None
    log(f"speed: {json.dumps(res['median'])} ratios {json.dumps(res.get('mc_vs_float'))}")
    return res


PARTS = {"quality": part_quality, "tp": part_tp, "load": part_load, "speed": part_speed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine-job", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench-vllm"))
    p.add_argument("--parts", default="quality,tp,load,speed")
    p.add_argument("--out", default=None, help="JSON file (default: <work-dir>/bench_vllm.json)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--windows", type=int, default=12, help="scored 256-token windows")
    p.add_argument("--prompts", type=int, default=16, help="greedy completion prompts")
    p.add_argument("--protect-first", default="0,4", help="vLLM ODP protections to measure (first N positions)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens per speed request")
    p.add_argument("--speed-servers", default="float,mc,mc_odp", help="speed: which of float,mc,mc_odp (mc always)")
    p.add_argument("--c1-only", action="store_true", help="speed: concurrency 1 only (e.g. ODP on vs off)")
    args = p.parse_args(argv)
    if args.engine_job:
        engine_job(args.engine_job)
        return 0
    args.protect_first = [int(x) for x in args.protect_first.split(",") if x]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_path = Path(args.out or work / "bench_vllm.json")
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    from optimum_mc.tools.provenance import provenance

    for part in [x for x in args.parts.split(",") if x]:
        t0 = time.monotonic()
        log(f"part {part} (load {load_avg()})")
        result[part] = PARTS[part](work, args) | {"seconds": round(time.monotonic() - t0), "load_end": load_avg()}
        result[part]["provenance"] = provenance()
        result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
        out_path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
