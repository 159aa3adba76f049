"""`helios` command line: serve, generate, calibrate, convert, bench, dashboards, k8s."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _generate(args) -> int:
    from engine.config import EngineConfig, SamplingParams, from_pairs
    from engine.engine import LLMEngine

    engine = LLMEngine(from_pairs(EngineConfig, {"model": args.model, "depth": args.depth, "exits": not args.no_exits,
                                                  "device": args.device}, args.set, "--set"))
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

    cfg = CalibrationConfig(model=args.model, head_type=args.head, num_prompts=args.prompts, domains=args.domains,
                            rounds=args.rounds, max_new_tokens=args.new_tokens, samples=args.samples,
                            steps=args.steps, target=args.target,
                            text_file=args.text, device=args.device,
                            **({} if args.vocab_size is None else {"vocab_size": args.vocab_size}))
    report = calibrate(cfg)
    print(json.dumps(report.summary, indent=2))
    if args.ship:
        from engine.engine import LLMEngine
        from engine.exits import SHIPPED

        engine = LLMEngine(model=args.model, max_batch_size=1, exit_policy="full")
        engine.exits.save(SHIPPED / engine.name, compact=True)
        print(f"shipped: {SHIPPED / engine.name}")
    return 0


def _serve(args) -> int:
    import os
    import signal
    import threading

    from cluster.config import ClusterConfig
    from cluster.local import start
    from telemetry.schema import redact_url

    cfg = ClusterConfig.load(args.config)
    if args.port is not None:
        cfg.port = args.port
    cluster = start(cfg, embedded_redis=not os.environ.get("REDIS_URL") and args.config is None
                    and not os.environ.get("HELIOS_CONFIG"))
    print(f"helios: serving {', '.join(c.name for c in cfg.candidates)} at {cluster.url}/v1 "
          f"(telemetry: {redact_url(cfg.telemetry.redis_url)}); Ctrl-C stops", flush=True)
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


def _dashboards(args) -> int:
    from telemetry import dashboards

    if args.action == "render":
        for path in dashboards.render(Path(args.out)):
            print(path)
        return 0
    try:
        reply = dashboards.push(args.grafana_url, args.api_key, args.folder_uid)
    except Exception as e:  # grafana-client raises its own hierarchy, plus connection errors
        raise RuntimeError(f"push to {args.grafana_url} failed: {e}") from e
    print(json.dumps(reply))
    return 0


def _k8s(args) -> int:
    from cluster.config import ClusterConfig
    from cluster.k8s import render

    for path in render(ClusterConfig.load(args.config), Path(args.out)):
        print(path)
    return 0


def _bench(args) -> int:
    from bench.helios import main as bench_main

    bench_main(args.rest)
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
    g.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="any other EngineConfig field, e.g. --set dtype=bfloat16 exit_policy=ride_along")
    g.set_defaults(fn=_generate)

    c = sub.add_parser("calibrate", help="train exit heads and agreement predictors, choose thresholds")
    c.add_argument("model")
    c.add_argument("--head", default="linear", choices=["linear", "mlp"])
    c.add_argument("--prompts", type=int, default=64, help="prompts per domain to generate training text from")
    c.add_argument("--domains", nargs="+", default=["code", "chat"], choices=["code", "chat"],
                   help="calibration prompt sets: HumanEval 64..163, and the chat questions in engine/prompts")
    c.add_argument("--rounds", type=int, default=2, choices=[1, 2], help="2 adds the on-policy round")
    c.add_argument("--new-tokens", type=int, default=96)
    c.add_argument("--samples", type=int, default=1, help="replies per prompt: the greedy one, the rest sampled "
                   "(temperature 0.8): more distinct contexts for the heads")
    c.add_argument("--steps", type=int, default=300, help="KL tuning steps for the heads")
    c.add_argument("--target", type=float, default=0.95, help="agreement with the full model to keep, per domain")
    c.add_argument("--vocab-size", type=int, default=None,
                   help="exit vocabulary: how many of the calibration text's most frequent tokens exits may emit "
                   "(default: CalibrationConfig.vocab_size; 0: the full vocabulary)")
    c.add_argument("--text", default=None, help="a text file of prompts, one per line, instead of the domains")
    c.add_argument("--ship", action="store_true", help="also write the compact heads into the package "
                   "(engine/trained/MODEL), which serve whenever HELIOS_HOME has no calibration of its own")
    c.add_argument("--device", default="cpu")
    c.set_defaults(fn=_calibrate)

    s = sub.add_parser("serve", help="start the local cluster: gateway, one deployment per candidate, controller")
    s.add_argument("--config", default=None, help="cluster YAML (default: embedded defaults, or HELIOS_CONFIG)")
    s.add_argument("--port", type=int, default=None)
    s.set_defaults(fn=_serve)

    v = sub.add_parser("convert", help="convert a checkpoint to the per-layer store")
    v.add_argument("model")
    v.set_defaults(fn=_convert)

    d = sub.add_parser("dashboards", help="Grafana dashboards: render JSON and provisioning files, or push")
    dsub = d.add_subparsers(dest="action", required=True)
    r = dsub.add_parser("render", help="write the dashboard JSON and file-provisioning YAML")
    r.add_argument("--out", default="grafana", help="directory to write into")
    p = dsub.add_parser("push", help="create or replace the dashboard in a running Grafana")
    p.add_argument("--grafana-url", required=True)
    p.add_argument("--api-key", required=True, help="a Grafana service-account token")
    p.add_argument("--folder-uid", default=None)
    d.set_defaults(fn=_dashboards)

    k = sub.add_parser("k8s", help="render the generated Kubernetes manifests (RayService, dashboards)")
    k.add_argument("action", choices=["render"])
    k.add_argument("--config", default=None, help="cluster YAML (default: embedded defaults)")
    k.add_argument("--out", default="k8s")
    k.set_defaults(fn=_k8s)

    b = sub.add_parser("bench", add_help=False, help="the HELIOS benchmark (`helios bench --help`)")
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=_bench)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser owns every option, --help included
        return _bench(argparse.Namespace(rest=argv[1:]))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # bad checkpoint, request, config; Redis down
        print(f"helios: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
