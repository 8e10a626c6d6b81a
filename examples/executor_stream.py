"""Stream several requests through the Executor at once, with priorities and a cancel.

Run: .venv/bin/python examples/executor_stream.py
"""

from choral import SamplingParams
from choral.executor import Executor, Request


def main() -> None:
    with Executor("smollm2-135m-instruct") as ex:
        questions = ["What is the capital of France?", "Name three colors.", "Count from one to ten."]
        ids = [ex.enqueue(Request([{"role": "user", "content": q}], SamplingParams(temperature=0, max_tokens=48),
                                  streaming=True, priority=i)) for i, q in enumerate(questions)]
        texts = {rid: "" for rid in ids}
        live = set(ids)
        while live:
            for response in ex.await_responses(timeout=30):
                result = response.result
                assert result is not None
                texts[response.request_id] += result.text
                if len(texts[ids[2]]) > 20:
                    ex.cancel(ids[2])  # cut the counting short: it ends CANCELLED with what it had
                if result.is_final:
                    live.discard(response.request_id)
                    print(f"[{response.request_id}] {result.finish_reason.name}: {texts[response.request_id]!r}")
        agg = ex.aggregate
        print(f"{agg.total_requests} requests, mean latency {agg.mean_latency_s:.2f} s, "
              f"{agg.mean_throughput_tps:.0f} tok/s while busy")


if __name__ == "__main__":
    main()
