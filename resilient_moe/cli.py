"""The `resilient-moe` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from resilient_moe.engine.config import SUPPORTED_DTYPES, SamplingParams
from resilient_moe.model.config import SUPPORTED_FAMILIES
from resilient_moe.errors import ConfigError, RequestError, ResilientMoeError
from resilient_moe.kernels import KERNEL_CHOICES

KERNELS_HELP = ("auto (default: native on CPU, triton on CUDA), native, torch (plain torch ops, not batch-invariant) "
                "or triton (batch-invariant Triton kernels; on a CPU only with TRITON_INTERPRET=1, for tests)")


class CliError(ResilientMoeError):
    """Bad command-line input (exit status 2)."""


def _prompt_ids(text: str) -> list[int]:
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not an integer token id (expected e.g. 1,2,3)") from None
    if not ids:
        raise argparse.ArgumentTypeError("no token ids given (expected e.g. 1,2,3)")
    return ids


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resilient-moe",
        description="Serve Mixture-of-Experts models that keep answering while their parts fail.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    tiny = sub.add_parser("make-tiny-model", help="write a small random-weight HF checkpoint")
    tiny.add_argument("out_dir", metavar="OUT_DIR")
    tiny.add_argument("--family", required=True, choices=SUPPORTED_FAMILIES)
    tiny.add_argument("--seed", type=_non_negative_int, default=0)
    tiny.add_argument("--hidden-size", type=_positive_int, default=64)
    tiny.add_argument("--layers", type=_positive_int, default=4)
    tiny.add_argument("--heads", type=_positive_int, default=4)
    tiny.add_argument("--kv-heads", type=_positive_int, default=2)
    tiny.add_argument("--experts", type=_positive_int, default=8)
    tiny.add_argument("--top-k", type=_positive_int, default=2)
    tiny.add_argument("--intermediate-size", type=_positive_int, default=128)
    tiny.add_argument("--vocab-size", type=_positive_int, default=512)
    tiny.add_argument("--max-position-embeddings", type=_positive_int, default=8192)

    gen = sub.add_parser("generate", help="generate tokens for one or more prompts")
    gen.add_argument("--model", metavar="DIR", help="HF checkpoint directory (default: the built-in demo model)")
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="text prompt (repeatable)")
    gen.add_argument("--prompt-ids", action="append", default=[], type=_prompt_ids, metavar="1,2,3",
                     help="token-id prompt (repeatable)")
    gen.add_argument("--max-tokens", type=_positive_int, default=32, help="(default: %(default)s)")
    gen.add_argument("--temperature", type=_float, default=0.0)
    gen.add_argument("--top-p", type=_float, default=1.0)
    gen.add_argument("--top-k", type=_non_negative_int, default=0)
    gen.add_argument("--seed", type=_non_negative_int, default=None)
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    gen.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32")
    gen.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    gen.add_argument("--kernels", choices=KERNEL_CHOICES, help=KERNELS_HELP)
    gen.add_argument("--json", action="store_true", help="print JSON instead of text")
    cluster = gen.add_argument_group("disaggregated run (launches a local cluster for this run)")
    cluster.add_argument("--config", metavar="YAML", help="deployment config (configs/*.yaml); flags override it")
    cluster.add_argument("--attention-workers", type=_positive_int, metavar="A")
    cluster.add_argument("--expert-workers", type=_positive_int, metavar="E")
    cluster.add_argument("--micro-batches", type=_positive_int, metavar="M")
    cluster.add_argument("--transport", choices=("shm", "tcp"))
    _launcher_flags(cluster)

    serve = sub.add_parser("serve", help="start a local cluster and serve it over an OpenAI-compatible HTTP API")
    serve.add_argument("--model", metavar="DIR", help="HF checkpoint directory (default: the built-in demo model)")
    serve.add_argument("--config", metavar="YAML", help="deployment config (configs/*.yaml); flags override it")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on; 0 picks a free one "
                       "(default: %(default)s)")
    serve.add_argument("--attention-workers", type=_positive_int, metavar="A", help="default 2 (without --config)")
    serve.add_argument("--expert-workers", type=_positive_int, metavar="E", help="default 3 (without --config)")
    serve.add_argument("--micro-batches", type=_positive_int, metavar="M")
    serve.add_argument("--frontends", type=_non_negative_int, metavar="N",
                       help="frontend processes serving the API on the one port (default 2; 0: in this process)")
    serve.add_argument("--supervisor-lease", type=_positive_float, metavar="S",
                       help="the cluster outlives this process for S seconds after its last lease renewal, and "
                            "the same command adopts it meanwhile (default 30)")
    serve.add_argument("--state-dir", metavar="DIR", help="where the hand-over to an adopting serve is kept "
                                                         "(default: ~/.local/state/resilient-moe)")
    serve.add_argument("--transport", choices=("shm", "tcp"))
    _launcher_flags(serve)
    serve.add_argument("--max-model-len", type=_positive_int, metavar="N", help="context length limit per request")
    serve.add_argument("--kernels", choices=KERNEL_CHOICES, help=KERNELS_HELP)
    serve.add_argument("--max-waiting-requests", type=_non_negative_int, default=256, metavar="N",
                       help="requests queued for admission before new ones get HTTP 429 (default: %(default)s)")
    serve.add_argument("--served-model-name", metavar="NAME", help="model name in the API (default: the "
                       "checkpoint directory's name)")
    serve.add_argument("--redis-url", metavar="URL", help="metadata Redis (default: a private one)")
    serve.add_argument("--admin-token", metavar="TOKEN", help="bearer token of /admin/ (default: "
                       "$RESILIENT_MOE_ADMIN_TOKEN, else generated and printed)")
    serve.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="/v1/* needs 'Authorization: Bearer KEY' (repeatable; also the comma-separated "
                            "$RESILIENT_MOE_API_KEYS; default: none, /v1 is open)")
    serve.add_argument("--log-dir", metavar="DIR", help="worker logs (default: a temporary directory)")
    serve.add_argument("--drain-timeout", type=_positive_float, metavar="S",
                       help="on SIGTERM, how long requests in flight get to finish (new ones get 503) before "
                            "everything stops (default: drain_timeout_s of the config, 30)")

    status = sub.add_parser("status", help="show a running server's cluster in the terminal")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    status.add_argument("--token", metavar="TOKEN", help="its admin token (default: $RESILIENT_MOE_ADMIN_TOKEN)")
    status.add_argument("--watch", action="store_true", help="redraw until Ctrl-C")
    status.add_argument("--interval", type=_positive_float, default=2.0, metavar="S",
                        help="seconds between redraws with --watch (default: %(default)s)")

    admin = sub.add_parser("admin", help="change a running server's cluster (needs its admin token)")
    actions = admin.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    scale = actions.add_parser("scale", help="change how many attention and expert workers run, while serving")
    rebalance = actions.add_parser("rebalance", help="place the experts by the load observed so far (load_aware)")
    for p in (scale, rebalance):
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
        p.add_argument("--token", metavar="TOKEN", help="its admin token (default: $RESILIENT_MOE_ADMIN_TOKEN)")
    scale.add_argument("--attention-workers", type=_positive_int, metavar="N")
    scale.add_argument("--expert-workers", type=_positive_int, metavar="M")

    from resilient_moe.planner.command import add_arguments as plan_arguments

    plan = sub.add_parser("plan", help="find the deployment (workers, micro-batches, batch) with the most throughput "
                          "per cost under an SLO, surviving failures (after MegaScale-Infer's plan search)")
    plan_arguments(plan, _positive_int, _non_negative_int, _positive_float)
    return parser


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from resilient_moe.model.tiny import TinySize, make_tiny_model

    size = TinySize(
        hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        num_experts=args.experts, top_k=args.top_k, intermediate_size=args.intermediate_size,
        vocab_size=args.vocab_size, max_position_embeddings=args.max_position_embeddings,
    )
    out = make_tiny_model(args.out_dir, args.family, seed=args.seed, size=size)
    print(f"wrote a {args.family} checkpoint to {out}")
    return 0


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, ignore_eos=args.ignore_eos,
    )


def _launcher_flags(parser) -> None:
    parser.add_argument("--launcher", choices=("local", "ray"),
                        help="local: every role a process on this host (default); ray: Ray actors across nodes")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="with --launcher ray: the Ray cluster to join (default: start a local Ray instance)")


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt and not args.prompt_ids:
        raise CliError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    fork_server = None
    if _wants_cluster(args) and args.launcher != "ray":  # the fork server imports torch while this process does
        from resilient_moe import auth
        from resilient_moe.launch.fork_server import ForkServer

        auth.install(auth.new_secret())  # this cluster's secret, before anything of it starts (Ray's makes its own)
        fork_server = ForkServer()
    try:
        return _generate(args, fork_server)
    finally:
        if fork_server is not None:
            fork_server.shutdown()


def _generate(args: argparse.Namespace, fork_server) -> int:
    from resilient_moe.engine.config import EngineConfig
    from resilient_moe.model.config import ModelConfig
    from resilient_moe.engine.engine import LLMEngine
    from resilient_moe.engine.tokenizer import TextTokenizer

    params = _sampling(args)
    model_dir = _model_dir(args)
    ModelConfig.from_pretrained(model_dir)  # a bad model directory fails here, before anything starts
    tokenizer = TextTokenizer.from_dir(model_dir)
    prompts: list[list[int]] = []
    if args.prompt:
        if tokenizer is None:
            raise CliError(f"{model_dir} has no tokenizer.json, so text prompts cannot be encoded; use --prompt-ids")
        prompts.extend(tokenizer.encode(text) for text in args.prompt)
    prompts.extend(args.prompt_ids)
    engine_config = EngineConfig(dtype=args.dtype, device=args.device, kernels=args.kernels or "auto")
    if _wants_cluster(args):
        outputs = _generate_disaggregated(args, model_dir, engine_config, prompts, params, fork_server)
    else:
        engine = LLMEngine(model_dir, engine_config)
        outputs = [r.token_ids for r in engine.generate(prompts, params)]
    records: list[dict[str, Any]] = [
        {"prompt_token_ids": prompt, "token_ids": out, "text": tokenizer.decode(out) if tokenizer else ""}
        for prompt, out in zip(prompts, outputs)
    ]
    if args.json:
        print(json.dumps(records[0] if len(records) == 1 else records))
    else:
        for record in records:
            print(record["text"] if tokenizer is not None else " ".join(map(str, record["token_ids"])))
    return 0


def check_kernels(engine) -> None:
    """Fail before anything starts when the engine's kernels cannot run on this host (every worker of a
    local cluster runs here)."""
    from resilient_moe.engine.engine import resolve_device
    from resilient_moe.kernels import resolve_kernels

    resolve_kernels(engine.kernels, resolve_device(engine.device).type, engine.dtype)


def _model_dir(args: argparse.Namespace) -> Path:
    """--model, else the model the --config YAML names (plan writes one), else the built-in demo model."""
    from resilient_moe.model.demo import demo_model_dir

    if args.model:
        return Path(args.model)
    if args.config:
        from resilient_moe.deployment import DeploymentConfig

        named = DeploymentConfig.from_yaml(args.config).model
        if named:
            return Path(named)
    return demo_model_dir()


def _wants_cluster(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.config, args.attention_workers, args.expert_workers, args.micro_batches,
                                       args.transport, args.launcher))


def deployment_from_args(args: argparse.Namespace, model_dir: Path, engine_config):
    """The deployment YAML (if any) with the command line's flags on top."""
    from resilient_moe.deployment import DeploymentConfig

    overrides = dict(
        model=str(model_dir), attention_workers=args.attention_workers, expert_workers=args.expert_workers,
        micro_batches=args.micro_batches, transport=args.transport, launcher=args.launcher,
        ray_address=args.ray_address,
    )
    if args.config:
        dep = DeploymentConfig.from_yaml(args.config, **overrides)
        engine = dataclasses.replace(dep.engine, dtype=engine_config.dtype)
        if args.kernels is not None:  # the flag wins over the file; without it the file's setting stands
            engine = dataclasses.replace(engine, kernels=args.kernels)
        return dataclasses.replace(dep, engine=engine)
    return DeploymentConfig.from_dict({}, source="command line", engine=engine_config, **overrides)


def _generate_disaggregated(args, model_dir: Path, engine_config, prompts: list[list[int]], params,
                            fork_server) -> list[list[int]]:
    from resilient_moe.launch import make_cluster
    from resilient_moe.server.frontend import Frontend, RequestFailed

    deployment = deployment_from_args(args, model_dir, engine_config)
    check_kernels(deployment.engine)
    with make_cluster(deployment, fork_server=fork_server) as cluster:
        frontend = Frontend(cluster.controller_address).start()
        try:
            handles = [frontend.submit(p, params) for p in prompts]
            outputs = []
            for handle in handles:
                try:
                    outputs.append(handle.wait(deployment.startup_timeout_s).token_ids)
                except RequestFailed as e:
                    raise CliError(f"request failed: {e}") from None
            return outputs
        finally:
            frontend.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from resilient_moe.engine.config import EngineConfig
    from resilient_moe.model.config import ModelConfig
    from resilient_moe.server.api import api_keys_from
    from resilient_moe.supervisor import ServingStack, run

    model_dir = _model_dir(args)
    ModelConfig.from_pretrained(model_dir)  # a bad model directory fails here, before anything starts
    if args.config is None:
        args.attention_workers = args.attention_workers or 2
        args.expert_workers = args.expert_workers or 3
    deployment = deployment_from_args(args, model_dir, EngineConfig(kernels=args.kernels or "auto"))
    if args.max_model_len is not None:
        deployment = dataclasses.replace(
            deployment, engine=dataclasses.replace(deployment.engine, max_model_len=args.max_model_len))
    if args.drain_timeout is not None:
        deployment = dataclasses.replace(deployment, drain_timeout_s=args.drain_timeout)
    if args.frontends is not None:
        deployment = dataclasses.replace(deployment, frontends=args.frontends)
    if args.supervisor_lease is not None:
        deployment = dataclasses.replace(deployment, supervisor_lease_s=args.supervisor_lease)
    check_kernels(deployment.engine)
    from resilient_moe import auth

    auth.install(auth.new_secret())  # this cluster's secret, before anything of it starts
    stack = ServingStack(
        deployment, host=args.host, port=args.port, admin_token=args.admin_token,
        model_name=args.served_model_name, max_waiting=args.max_waiting_requests, redis_url=args.redis_url,
        log_dir=args.log_dir, progress=lambda text: print(text, flush=True), api_keys=api_keys_from(args.api_key),
        state_dir=args.state_dir,
    )
    return run(stack, say=lambda text: print(text, flush=True))


def _admin_token(args: argparse.Namespace) -> str:
    import os

    from resilient_moe.supervisor import ADMIN_TOKEN_ENV

    token = args.token or os.environ.get(ADMIN_TOKEN_ENV)
    if not token:
        raise CliError(f"give the server's admin token: --token TOKEN or ${ADMIN_TOKEN_ENV} (serve prints it)")
    return token


def cmd_status(args: argparse.Namespace) -> int:
    from resilient_moe.server.status import show

    show(args.url, _admin_token(args), watch=args.watch, interval_s=args.interval)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from resilient_moe.planner.command import run

    return run(args)


def cmd_admin(args: argparse.Namespace) -> int:
    """POST /admin/scale or /admin/rebalance and print the answer."""
    import httpx

    token = _admin_token(args)
    if args.action == "scale":
        if args.attention_workers is None and args.expert_workers is None:
            raise CliError("give --attention-workers N, --expert-workers M or both")
        body = {k: v for k, v in (("attention_workers", args.attention_workers),
                                  ("expert_workers", args.expert_workers)) if v is not None}
    else:
        body = {}
    url = f"{args.url.rstrip('/')}/admin/{args.action}"
    try:
        response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10.0)
    except httpx.HTTPError as e:
        raise ResilientMoeError(f"cannot reach {url}: {e}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {"error": {"message": response.text[:200]}}
    if response.status_code != 200:
        message = (answer.get("error") or {}).get("message", response.text[:200]) if isinstance(answer, dict) else answer
        raise ResilientMoeError(f"{url}: HTTP {response.status_code}: {message}")
    print(json.dumps(answer))
    return 0


COMMANDS = {"make-tiny-model": cmd_make_tiny_model, "generate": cmd_generate, "serve": cmd_serve,
            "status": cmd_status, "admin": cmd_admin, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (CliError, ConfigError, RequestError) as e:
        parser.exit(2, f"resilient-moe {args.command}: error: {e}\n")
    except ResilientMoeError as e:
        parser.exit(1, f"resilient-moe {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
