"""The ``choral`` command line. ``choral generate --help`` tells a newcomer what they need."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from choral.config import DEFAULT_MODEL
from choral.errors import ChoralError


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Options that size and place the engine (shared by every command that loads a model)."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name, .gguf file or HF model directory (default: {DEFAULT_MODEL})")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV dtype; auto = bf16 where the CPU/GPU has it, else fp32")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    g.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache capacity in tokens")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="sequences per forward (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="tokens per forward, prompt chunks + decodes (default: 2048)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the model over N processes (CPU: gloo; CUDA: one GPU each, NCCL) (default: 1)")
    g.add_argument("--weights", default="auto", choices=["auto", "native", "dequantize"],
                   help="quantized weights: native = kept packed (CPU integer kernels), dequantize = "
                        "converted to --dtype at load; auto = native for quantized models on the CPU")
    g.add_argument("--quantization", default=None, choices=["q8_0", "q4_0"],
                   help="quantize a float model's weights at load and run them natively (default: off)")


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    return dict(model=args.model, dtype=args.dtype, device=args.device, kv_cache_tokens=args.kv_cache_tokens,
                block_size=args.block_size, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.threads,
                weights=args.weights, quantization=args.quantization,
                tensor_parallel_size=args.tensor_parallel_size,
                # serve's LoRA options (other commands have none: no adapter can be named there)
                enable_lora=getattr(args, "enable_lora", False) or bool(getattr(args, "lora", None)),
                max_loras=getattr(args, "max_loras", 4), max_lora_rank=getattr(args, "max_lora_rank", 16),
                # serve's draft model (speculative decoding)
                draft_model=getattr(args, "draft_model", None), draft_weights=getattr(args, "draft_weights", "auto"))


def cmd_generate(args: argparse.Namespace) -> int:
    from choral import LLM, SamplingParams

    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts.extend(line.rstrip("\n") for line in f if line.strip())
    if not prompts:
        print("choral generate: give at least one prompt (positional or --prompts-file)", file=sys.stderr)
        return 2
    schema = args.json_schema
    if schema is not None and not schema.lstrip().startswith("{"):
        with open(schema, encoding="utf-8") as f:  # a path to a schema file
            schema = f.read()
    grammar = None
    if args.grammar_file:
        with open(args.grammar_file, encoding="utf-8") as f:
            grammar = f.read()
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty, stop=tuple(args.stop or ()),
                            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos, n=args.n,
                            beam_width=args.beam_width, json_schema=schema, regex=args.regex, grammar=grammar)
    load_start = time.perf_counter()
    llm = LLM(**engine_options(args))  # type: ignore[arg-type]
    loaded = time.perf_counter() - load_start
    inputs: list[object] = [[{"role": "user", "content": p}] for p in prompts] if not args.raw else list(prompts)
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=not args.quiet)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f"\n### {prompt}")
        for completion in out.outputs:
            label = f"#{completion.index} " if len(out.outputs) > 1 else ""
            print(f"{label}{completion.text}  [{completion.finish_reason}]")
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    kv = llm.engine.kv_size
    print(f"\n{len(outputs)} request(s): {prompt_tokens} prompt + {generated} generated tokens in "
          f"{elapsed:.2f} s = {generated / max(elapsed, 1e-9):.1f} tok/s "
          f"(load {loaded:.1f} s, {llm.engine.loaded.model.dtype}, KV cache {kv.num_tokens} tokens / "
          f"{kv.num_bytes / 2**20:.0f} MiB, {_threads(llm.engine)})")
    return 0


def _threads(engine: Any) -> str:
    import torch

    if engine.loaded.model.device.type != "cpu":
        return str(engine.loaded.model.device)
    return f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from choral.server.loading import LoadingApp
    from choral.server.tool_parsers import format_named

    if args.tool_call_parser:
        format_named(args.tool_call_parser)  # an unknown name fails now, not after loading
    name = args.served_model_name or args.model
    if args.speculative == "draft" and not args.draft_model:
        print("choral serve: --speculative draft needs --draft-model PATH", file=sys.stderr)
        return 2
    loras: list[tuple[str, str]] = []
    for item in (x for group in (args.lora or []) for x in group):
        lora_name, sep, lora_path = item.partition("=")
        if not sep or not lora_name or not lora_path:
            print(f"choral serve: --lora {item!r}: expected NAME=PATH", file=sys.stderr)
            return 2
        if lora_name == name or lora_name in (n for n, _ in loras):
            print(f"choral serve: --lora {item!r}: the name {lora_name!r} is already taken", file=sys.stderr)
            return 2
        loras.append((lora_name, lora_path))

    from choral.server.limits import ServerLimits

    scale_flags = [flag for flag, value in (("--routing", args.routing), ("--replica-cpus", args.replica_cpus),
                                            ("--ray-address", args.ray_address)) if value is not None]
    if args.replicas < 1:
        print(f"choral serve: --replicas {args.replicas}: must be at least 1", file=sys.stderr)
        return 2
    if args.replicas == 1 and scale_flags:
        print(f"choral serve: {', '.join(scale_flags)} only apply with --replicas N > 1", file=sys.stderr)
        return 2

    limits = ServerLimits(
        max_request_bytes=args.max_request_bytes, max_json_items=args.max_json_items,
        max_prompt_chars=args.max_prompt_chars, max_prompts=args.max_prompts, max_n=args.max_n,
        max_logit_bias=args.max_logit_bias, max_stop=args.max_stop, max_template_chars=args.max_template_chars,
        template_timeout_s=args.template_timeout, prep_workers=args.prep_workers)

    if args.replicas > 1:
        return _serve_replicas(args, name, limits, loras)

    def build() -> object:
        from choral.config import EngineConfig
        from choral.engine.llm_engine import LLMEngine
        from choral.executor import Executor
        from choral.server.app import create_app

        config = _executor_config(args)  # checked before the model loads
        engine = LLMEngine(EngineConfig.from_kwargs(**engine_options(args)))
        for lora_name, lora_path in loras:
            engine.core.load_lora(lora_name, lora_path)
        if engine.tokenizer is not None:
            engine.tokenizer.warm_up()  # chat templates need transformers: import it before the first request
        executor = Executor(engine, config)
        app = create_app(executor, name, api_key=args.api_key, limits=limits, strict=args.strict,
                         tool_call_parser=args.tool_call_parser, pooling=args.pooling)
        kv = engine.kv_size
        print(f"choral: serving {name!r} on http://{args.host}:{args.port}/v1 (KV cache {kv.num_tokens} tokens, "
              f"{kv.num_bytes / 2**20:.0f} MiB; {engine.loaded.model.dtype}; {_threads(engine)})", flush=True)
        return app

    server: _GracefulServer | None = None

    def failed(error: BaseException) -> None:
        print(f"choral serve: {error}", file=sys.stderr, flush=True)
        if server is not None:
            server.server.should_exit = True  # uvicorn checks it every tick

    app = LoadingApp(build, failed)  # type: ignore[arg-type]
    print(f"choral: loading {args.model!r}; http://{args.host}:{args.port}/health answers 503 until it is ready",
          flush=True)
    # SIGTERM/SIGINT: stop accepting, let in-flight requests finish for up to --graceful-timeout
    # seconds, cancel whatever still runs, exit 0.
    server_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.graceful_timeout)
    server = _GracefulServer(server_config)
    server.run()
    if app.app is not None:
        app.app.state.executor.shutdown(wait=False)
        app.app.state.executor.engine.close()  # tensor-parallel workers, if any
    return 1 if app.error is not None else 0


def _executor_config(args: argparse.Namespace) -> Any:
    """serve's executor options as an ExecutorConfig (validated now, before any model loads)."""
    from choral.executor import BatchingStrategy, ExecutorConfig, KvPolicy
    from choral.speculative import SpeculativeConfig

    speculative = None
    method = args.speculative if args.speculative is not None else "draft" if args.draft_model else "off"
    if method != "off":
        speculative = SpeculativeConfig(method=method, k=args.spec_k, p_min=args.spec_p_min)
    return ExecutorConfig(strategy=BatchingStrategy(args.strategy), kv_policy=KvPolicy(args.kv_policy),
                          max_queue_size=args.max_queue_size, enable_prefix_cache=not args.no_prefix_cache,
                          speculative=speculative)


def _serve_replicas(args: argparse.Namespace, name: str, limits: Any, loras: list[tuple[str, str]]) -> int:
    """``choral serve --replicas N``: N engines as Ray Serve replicas (docs/scale-out.md)."""
    import os

    if importlib.util.find_spec("ray") is None:
        print("choral serve: --replicas needs Ray Serve, which is not installed: pip install 'choral[ray]'",
              file=sys.stderr)
        return 2
    if loras or args.enable_lora:
        print("choral serve: --lora / --enable-lora are not supported with --replicas yet (an adapter loaded at "
              "run time would reach one replica only)", file=sys.stderr)
        return 2
    from choral.config import EngineConfig
    from choral.scale.config import ReplicaConfig, RoutingConfig, ServerOptions
    from choral.scale.ray_serve import run

    cpus = args.replica_cpus
    if cpus is None:  # a local cluster: the machine shared out; an existing cluster: one CPU each
        cpus = 1.0 if args.ray_address else (os.cpu_count() or 1) / args.replicas
    config = ReplicaConfig(
        num_replicas=args.replicas, engine=EngineConfig.from_kwargs(**engine_options(args)),
        executor=_executor_config(args),
        server=ServerOptions(model_name=name, api_key=args.api_key, limits=limits, strict=args.strict,
                             tool_call_parser=args.tool_call_parser, pooling=args.pooling),
        routing=RoutingConfig(policy=args.routing or "prefix"), cpus_per_replica=cpus,
        graceful_timeout_s=float(args.graceful_timeout))
    return run(config, args.host, args.port, address=args.ray_address, log_level=args.log_level)


class _GracefulServer:
    """uvicorn's Server, minus re-raising the signal after shutdown (which would exit non-zero)."""

    def __init__(self, config: object):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        self.server = Server(config)  # type: ignore[arg-type]

    def run(self) -> None:
        self.server.run()


def cmd_bench(args: argparse.Namespace) -> int:
    import json as _json

    from choral.bench import plot, run_bench, table, to_json

    wanted = (("--url", "httpx", args.url), ("--plot", "matplotlib", args.plot))
    missing = [(flag, module) for flag, module, used in wanted if used and importlib.util.find_spec(module) is None]
    if missing:
        flag, module = missing[0]
        print(f"choral bench: {flag} needs {module}, which is not installed; install the bench extras: "
              "pip install 'choral[bench]'", file=sys.stderr)
        return 2
    levels = [int(x) for x in str(args.concurrency).split(",") if x]
    if not levels or min(levels) < 1:
        print("choral bench: --concurrency needs positive integers, e.g. 1,4,16", file=sys.stderr)
        return 2
    executor = None
    vocab = 32000
    if args.url is None:
        from choral.executor import Executor, ExecutorConfig

        executor = Executor(config=ExecutorConfig(max_queue_size=max(1024, args.num_prompts)),
                            **engine_options(args))  # type: ignore[arg-type]
        vocab = executor.engine.loaded.spec.vocab_size
    try:
        results = run_bench(levels, args.num_prompts, args.input_len, args.output_len, args.seed,
                            executor=executor, url=args.url, model=args.served_model_name,
                            vocab=args.vocab or vocab, progress=not args.quiet)
    finally:
        if executor is not None:
            executor.shutdown(wait=False)
    target = args.url or f"in-process {args.model}"
    print(f"\n## choral bench: {target}, {args.num_prompts} requests per level, "
          f"input {args.input_len} / output {args.output_len} tokens\n")
    print(table(results))
    meta = {"target": target, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "seed": args.seed}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            _json.dump(to_json(results, meta), f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(results, args.plot, f"choral bench: {target}")
        print(f"wrote {args.plot}")
    return 0


CHAT_COMMANDS = {
    "/help": "this list",
    "/reset": "clear the history",
    "/system TEXT": "set the system prompt (and clear the history); /system alone removes it",
    "/exit": "quit (also /quit, Ctrl-D)",
}


def _chat_help() -> str:
    lines = [f"  {name:<14} {what}" for name, what in CHAT_COMMANDS.items()]
    return "\n".join([*lines, "  //TEXT         send TEXT starting with a single /",
                      "Up/Down recall earlier lines; Ctrl-C stops an answer."])


def _line_editing(history: Path | None) -> None:
    """readline line editing for input() (arrows, Ctrl-A/E, search) and a history kept across sessions."""
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input()
        return
    readline.set_history_length(1000)
    if history is None:
        return
    with contextlib.suppress(OSError):
        readline.read_history_file(history)

    def save() -> None:
        with contextlib.suppress(OSError):
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)

    import atexit

    atexit.register(save)


def cmd_chat(args: argparse.Namespace) -> int:
    from choral.kernels.build import cache_dir

    _line_editing(None if args.no_history else cache_dir().parent / "chat_history")
    print(f"choral chat: loading {args.model} ...", flush=True)
    start = time.perf_counter()
    from choral.conversation import BatchedExecutor, CancelToken, ChatSession
    from choral.sampling.params import SamplingParams

    executor = BatchedExecutor(**engine_options(args))
    if executor.tokenizer is not None:
        executor.tokenizer.warm_up()  # the chat template's machinery loads while the user types
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
    system: str | None = args.system
    session = ChatSession(executor.create(), system_prompt=system)
    print(f"choral chat: ready in {time.perf_counter() - start:.1f} s. Type a message; /help lists the commands "
          "(/reset, /system TEXT, /exit); Ctrl-C stops an answer.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("//"):
            text = text[1:]  # a message that starts with "/"
        elif text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/help":
                print(_chat_help(), flush=True)
                continue
            if command in ("/reset", "/system"):
                if command == "/system":
                    system = rest.strip() or None
                session.conversation.close()
                session = ChatSession(executor.create(), system_prompt=system)
                print("(history cleared)" if command == "/reset" else f"(system prompt: {system!r}; history cleared)",
                      flush=True)
                continue
            print(f"(unknown command {command}; commands: {', '.join(c.split()[0] for c in CHAT_COMMANDS)}, /quit; "
                  "start with // to send a message beginning with /)", flush=True)
            continue
        # Ctrl-C during an answer stops it after the current token; the partial answer stays in
        # the history (the KV cache keeps every turn, so the next turn feeds only new tokens).
        cancel = CancelToken()
        previous = signal.signal(signal.SIGINT, lambda *_, token=cancel: token.cancel())
        try:
            session.prompt(text, max_tokens=args.max_tokens, params=params,
                           on_text=lambda piece: print(piece, end="", flush=True), cancel=cancel)
        except ChoralError as e:
            print(f"\n(error: {e})", flush=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        print(flush=True)
    executor.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="choral",
        description="choral: run many LLM conversations and requests through one model at once.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine start-up details")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate completions for prompts, batched",
        description="Generate for one or more prompts in one batch. Prompts are sent as chat messages "
                    "through the model's chat template unless --raw is given. Example:\n"
                    "  choral generate 'What is the capital of France?' 'Name three colors.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", nargs="*", help="prompts (each one a separate request)")
    gen.add_argument("--prompts-file", help="a file with one prompt per line")
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default: all)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top one (default: 0)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="HF repetition penalty (default: 1)")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty (default: 0)")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty (default: 0)")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--n", type=int, default=1,
                     help="completions per prompt, sharing its KV; needs --temperature > 0 (default: 1)")
    gen.add_argument("--beam-width", type=int, default=1, help="beam search with this many beams (default: off)")
    gen.add_argument("--json-schema", help="constrain output to a JSON schema (inline JSON or a file path)")
    gen.add_argument("--regex", help="constrain output to a regular expression")
    gen.add_argument("--grammar-file", help="constrain output to a GBNF/EBNF or Lark grammar file")
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve the model over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, "
                    "/v1/models, /health, /metrics, /tokenize, /detokenize). Example:\n"
                    "  choral serve --model smollm2-135m-instruct --port 8000\n"
                    "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    serve.add_argument("--served-model-name", default=None, help="model id clients use (default: --model)")
    serve.add_argument("--lora", "--lora-modules", dest="lora", action="append", nargs="+", metavar="NAME=PATH",
                       help="load a LoRA adapter (a PEFT directory or a GGUF LoRA file) as model id NAME "
                            "(repeatable; implies --enable-lora)")
    serve.add_argument("--enable-lora", action="store_true",
                       help="accept adapters loaded at run time (POST /v1/load_lora_adapter; docs/lora.md)")
    serve.add_argument("--max-loras", type=int, default=4, help="adapters one step may use (default: 4)")
    serve.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted (default: 16)")
    serve.add_argument("--max-queue-size", type=int, default=1024, help="queued requests before 429 (default: 1024)")
    serve.add_argument("--strategy", default="continuous",
                       choices=["continuous", "static", "fixed_size", "dynamic_timeout", "adaptive"],
                       help="batching strategy (default: continuous)")
    serve.add_argument("--kv-policy", default="max_utilization", choices=["max_utilization", "guaranteed_no_evict"],
                       help="KV admission policy (default: max_utilization)")
    serve.add_argument("--no-prefix-cache", action="store_true", help="disable the automatic prefix cache")
    serve.add_argument("--speculative", default=None, choices=["off", "ngram", "draft"],
                       help="speculative decoding for requests that do not choose: ngram = prompt lookup, "
                            "draft = the --draft-model (default: draft with --draft-model, else off)")
    serve.add_argument("--spec-k", type=int, default=4, help="most tokens proposed per step (default: 4)")
    serve.add_argument("--spec-p-min", type=float, default=0.75,
                       help="draft: end a proposal at a token the draft gives less probability (default: 0.75)")
    serve.add_argument("--draft-model", default=None, metavar="PATH",
                       help="a draft model for speculative decoding (same tokenizer: a smaller model, or a "
                            "quantized copy of the model); requests use it with speculative={'method': 'draft'}")
    serve.add_argument("--draft-weights", default="auto", choices=["auto", "native", "dequantize"],
                       help="how the draft model's quantized weights run (default: auto)")
    rep = serve.add_argument_group("replicas (Ray Serve; docs/scale-out.md)")
    rep.add_argument("--replicas", type=int, default=1,
                     help="serve N engines as Ray Serve replicas behind this one endpoint, with prefix-aware "
                          "routing; needs choral[ray] (default: 1, a single process without Ray)")
    rep.add_argument("--routing", default=None, choices=["prefix", "pow2"],
                     help="prefix = to the replica caching the prompt's prefix, the least loaded when loads "
                          "differ by more than 8 requests; pow2 = Serve's power of two choices (default: prefix)")
    rep.add_argument("--replica-cpus", type=float, default=None,
                     help="CPUs Ray reserves per replica; the engine's threads default to it (default: this "
                          "machine's CPUs / N, or 1 on an existing cluster)")
    rep.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. auto) instead of starting a local one")
    serve.add_argument("--graceful-timeout", type=int, default=10,
                       help="seconds in-flight requests may finish after SIGTERM (default: 10)")
    serve.add_argument("--log-level", default="warning", help="uvicorn log level (default: warning)")
    serve.add_argument("--strict", action="store_true",
                       help="refuse unknown request fields with a 400 (default: ignore them with a warning)")
    serve.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                       help="how the model writes tool calls (default: read from its chat template)")
    serve.add_argument("--pooling", default="last", choices=["last", "mean"],
                       help="/v1/embeddings: the last token's hidden state, or the mean over the tokens "
                            "(default: last)")
    lim = serve.add_argument_group("per-request limits (checked before any expensive work)")
    lim.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                     help="request body size in bytes, 413 past it (default: 4 MiB)")
    lim.add_argument("--max-json-items", type=int, default=2**18,
                     help="JSON values in a request body, 413 past it (default: 262144)")
    lim.add_argument("--max-prompt-chars", type=int, default=None,
                     help="characters of one text prompt or chat (default: 32 per token of context, >= 65536)")
    lim.add_argument("--max-prompts", type=int, default=64, help="prompts per completion request (default: 64)")
    lim.add_argument("--max-n", type=int, default=16, help="largest n (default: 16)")
    lim.add_argument("--max-logit-bias", type=int, default=1024, help="logit_bias entries (default: 1024)")
    lim.add_argument("--max-stop", type=int, default=64, help="stop strings (default: 64)")
    lim.add_argument("--max-template-chars", type=int, default=None,
                     help="characters a chat template may render (default: --max-prompt-chars)")
    lim.add_argument("--template-timeout", type=float, default=5.0,
                     help="seconds a chat template may run (default: 5)")
    lim.add_argument("--prep-workers", type=int, default=2,
                     help="threads that tokenize and validate requests off the event loop (default: 2)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser(
        "chat",
        help="interactive chat in the terminal, streaming",
        description="Chat with the model using its chat template. The whole history lives in one "
                    "conversation's KV cache, so each turn only feeds the new tokens. Line editing and "
                    "input history (Up/Down) as in a shell. Commands: /help, /reset, /system TEXT, /exit. "
                    "Example:\n  choral chat --system 'You are terse.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    chat.add_argument("--max-tokens", type=int, default=256, help="longest answer in tokens (default: 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    chat.add_argument("--seed", type=int, default=None, help="sampling seed")
    chat.add_argument("--no-history", action="store_true",
                      help="keep no input history on disk (default: kept in the cache directory, chat_history)")
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser(
        "bench",
        help="measure throughput and latency at several concurrency levels",
        description="Run N streaming requests per concurrency level (random prompt ids, fixed output length, "
                    "EOS ignored) against the in-process executor, or a server with --url, and print "
                    "throughput plus TTFT / TPOT / latency percentiles. Examples:\n"
                    "  choral bench --concurrency 1,4,16 --num-prompts 32 --plot bench.png --json bench.json\n"
                    "  choral bench --url http://127.0.0.1:8000 --concurrency 1,8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--url", default=None, help="benchmark a running server (its base URL) instead")
    bench.add_argument("--concurrency", default="1,4,16", help="comma-separated levels (default: 1,4,16)")
    bench.add_argument("--num-prompts", type=int, default=32, help="requests per level (default: 32)")
    bench.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    bench.add_argument("--output-len", type=int, default=64, help="generated tokens (default: 64)")
    bench.add_argument("--seed", type=int, default=0, help="prompt generator seed (default: 0)")
    bench.add_argument("--vocab", type=int, default=None, help="token id range for --url runs (default: 32000)")
    bench.add_argument("--served-model-name", default=None, help="model field sent to the server")
    bench.add_argument("--json", default=None, help="write results (and per-request samples) as JSON")
    bench.add_argument("--plot", default=None, help="write a PNG: throughput and latency vs concurrency")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from choral import progress

    # Slow steps (loading, compiling kernels, building caches) say so on stderr, unless --quiet.
    previous = progress.set_enabled(not getattr(args, "quiet", False))
    try:
        return int(args.func(args))
    except ChoralError as e:
        print(f"choral: error: {e}", file=sys.stderr)
        return 1
    finally:
        progress.set_enabled(previous)


if __name__ == "__main__":
    sys.exit(main())
