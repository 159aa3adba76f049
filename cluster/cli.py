"""`helios` command line: serve, generate, calibrate, convert."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    from engine.config import EngineConfig, SamplingParams
    from engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=args.model, depth=args.depth, exits=not args.no_exits, device=args.device))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=args.stop or [])
    prompts = args.prompt or ["def fibonacci(n):", "The three primary colours are"]
    for prompt, result in zip(prompts, engine.generate(prompts, params)):
        layers = [e.layer for e in result.exits]
        greedy = sum(e.greedy for e in result.exits)
        print(f"--- {prompt!r}\n{result.text}")
        print(f"[{engine.name}: {len(layers)} tokens, depth {engine.depth}/{engine.num_layers}, "
              f"mean exit layer {sum(layers) / max(len(layers), 1):.1f}, greedy exits {greedy}]")
    return 0


def _calibrate(args) -> int:
    from engine.calibrate import CalibrationConfig, calibrate

    cfg = CalibrationConfig(model=args.model, head_type=args.head, num_prompts=args.prompts,
                            max_new_tokens=args.new_tokens, steps=args.steps, target=args.target,
                            text_file=args.text, device=args.device)
    report = calibrate(cfg)
    print(json.dumps(report.summary, indent=2))
    return 0


def _serve(args) -> int:
    import os
    import signal
    import threading

    from cluster.config import ClusterConfig
    from cluster.local import start

    cfg = ClusterConfig.load(args.config)
    if args.port is not None:
        cfg.port = args.port
    cluster = start(cfg, embedded_redis=not os.environ.get("REDIS_URL") and args.config is None
                    and not os.environ.get("HELIOS_CONFIG"))
    print(f"helios: serving {', '.join(c.name for c in cfg.candidates)} at {cluster.url}/v1 "
          f"(telemetry: {cfg.telemetry.redis_url}); Ctrl-C stops", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    print("helios: shutting down", flush=True)
    cluster.shutdown()
    return 0


def _convert(args) -> int:
    from engine.config import helios_home
    from engine.store import LayerStore, ensure_converted

    store = LayerStore(ensure_converted(args.model, helios_home()))
    print(json.dumps({"path": str(store.root), **store.manifest}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="helios", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with the early-exit engine")
    g.add_argument("prompt", nargs="*")
    g.add_argument("--model", default="smollm2")
    g.add_argument("--depth", type=int, default=None, help="decoder layers to load (default: all)")
    g.add_argument("--no-exits", action="store_true", help="ignore calibrated exit heads")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--device", default="cpu")
    g.set_defaults(fn=_generate)

    c = sub.add_parser("calibrate", help="train exit heads and agreement predictors, choose thresholds")
    c.add_argument("model")
    c.add_argument("--head", default="linear", choices=["linear", "mlp"])
    c.add_argument("--prompts", type=int, default=64, help="HumanEval prompts (of 164) to generate training text from")
    c.add_argument("--new-tokens", type=int, default=64)
    c.add_argument("--steps", type=int, default=200, help="KL tuning steps for the heads")
    c.add_argument("--target", type=float, default=0.95, help="agreement with the full model to keep")
    c.add_argument("--text", default=None, help="a text file of prompts, one per line, instead of HumanEval")
    c.add_argument("--device", default="cpu")
    c.set_defaults(fn=_calibrate)

    s = sub.add_parser("serve", help="start the local cluster: gateway, one deployment per candidate, controller")
    s.add_argument("--config", default=None, help="cluster YAML (default: embedded defaults, or HELIOS_CONFIG)")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=_serve)

    v = sub.add_parser("convert", help="convert a checkpoint to the per-layer store")
    v.add_argument("model")
    v.set_defaults(fn=_convert)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad checkpoint, request, config; Redis down
        print(f"helios: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
