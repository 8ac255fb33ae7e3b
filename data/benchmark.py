"""`launch/bench.py data`: the streaming data pipeline's tokens/s against the tokenizer's raw `encode_batch` on the
same documents, pre-tokenized `.bin/.idx` shards against on-the-fly tokenizing, a 3-source mixture, and the
`data.shards` 1, 8 and 32 rows, each with an exact parity check (docs/benchmarks.md#data-pipeline). Performance is
reported, never asserted: `tests/test_bench.py` checks the parity figures only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig, MixtureSource
from .indexed import IndexedWriter, dtype_for_vocab
from .loader import Blend, Pipeline, build_loader, build_source, build_tokenizer, stream_seed
from .sources import FileSource, Position, text_extractor
from .tokenizer import PIECE_CHARS, document_pieces


def raw_encodings(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's ids from the raw tokenizer, then EOS: one `encode_batch` call for the texts, with the
    tokenizer's own special tokens, except that a document longer than `data.tokenizer.PIECE_CHARS` characters is
    encoded as its `document_pieces` (cut where the pre-tokenizer splits; special tokens on the first piece only),
    which is what the pipeline is specified to make of it (docs/data.md), not one call's ids of the whole text."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    pieces = [document_pieces(text) for text in texts]
    firsts = iter(tokenizer.tokenizer.encode_batch([p[0] for p in pieces]))
    rests = iter(tokenizer.tokenizer.encode_batch([q for p in pieces for q in p[1:]], add_special_tokens=False))
    return [next(firsts).ids + [i for _ in p[1:] for i in next(rests).ids] + eos for p in pieces]


def packed_reference(tokenizer, texts: list[str], seq: int, encodings: list[list[int]] | None = None) -> np.ndarray:
    """(R, 2 * seq) int64: the rows a correct pretraining pipeline makes of `texts` before shuffling, each as its
    inputs then its targets. Built from the raw tokenizer alone (`raw_encodings`, or `encodings` already made by
    it): each document's encoding then EOS, concatenated and cut into windows of seq + 1 tokens (inputs
    window[:-1], targets window[1:]); the last partial window is left out."""
    encodings = raw_encodings(tokenizer, texts) if encodings is None else encodings
    stream = np.fromiter(chain.from_iterable(encodings), np.int64)
    windows = stream[:len(stream) // (seq + 1) * (seq + 1)].reshape(-1, seq + 1)  # (R, seq + 1)
    return np.concatenate((windows[:, :-1], windows[:, 1:]), axis=1)


def whole_document_differences(tokenizer, names: list[str], texts: list[str],
                               encodings: list[list[int]]) -> list[dict]:
    """The documents tokenized in pieces (longer than PIECE_CHARS characters) whose ids differ from one call's ids
    of the whole text: name, characters, tokens both ways, first position that differs."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    out = []
    for name, text, ids in zip(names, texts, encodings):
        if len(text) <= PIECE_CHARS:
            continue
        whole = tokenizer.tokenizer.encode(text).ids + eos
        if whole != ids:
            first = next((i for i, (a, b) in enumerate(zip(ids, whole)) if a != b), min(len(ids), len(whole)))
            out.append({"document": name, "characters": len(text), "tokens": len(ids), "whole_tokens": len(whole),
                        "first_difference": first})
    return out


def batch_rows(batch: dict[str, torch.Tensor]) -> np.ndarray:
    """A pretraining micro-batch as (B, 2 * seq) int64 rows, inputs then targets, as `packed_reference` lays them."""
    return torch.cat((batch["input_ids"], batch["labels"]), dim=1).numpy()


SHARD_COUNTS = (1, 8, 32)
"""`data.shards` of the shard rows of the data benchmark."""
INDEXED_FILES = 4
"""Files the data benchmark splits its documents over (JSON Lines and .bin/.idx alike), so shards span several."""
MIXTURE = (("text", 0.5), ("tokens-a", 0.3), ("tokens-b", 0.2))
"""The data benchmark's mixture: JSON Lines tokenized on the fly, and two indexed sources (halves of the files)."""
V2_LITE_SEQ = 4096
"""The sequence length the sustained rate is also given in rows/s at."""


def first_epoch_file_order(n_files: int, seed: int = 0) -> list[int]:
    """Indices of `n_files` files whose names sort in index order, in the order a one-source `data.source=files`
    loader of `seed` reads them in its first epoch (`FileSource.file_order`)."""
    names = [Path(f"{i:04d}") for i in range(n_files)]
    source = FileSource(names, text_extractor("text"), "text", stream_seed(seed, 0), 0, 1)
    return [int(path.name) for path in source.file_order(0)]


def write_corpus(folder: Path, stem: str, documents: list, dtype=None, files: int = INDEXED_FILES) -> list[Path]:
    """`documents` split over `files` files `<stem>-NN.jsonl` (texts, as {"text": ...}) or `<stem>-NN.bin/.idx`
    (token arrays, `dtype`), such that a loader of seed 0 reads them, in its first epoch, in the order given: the
    j-th file it reads holds the j-th contiguous part. Returns the files in name order."""
    parts = np.array_split(np.arange(len(documents)), files)
    paths = []
    for j, i in enumerate(first_epoch_file_order(files)):
        if dtype is None:
            path = folder / f"{stem}-{i:02d}.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps({"text": documents[k]}) + "\n" for k in parts[j])
        else:
            path = folder / f"{stem}-{i:02d}.bin"
            with IndexedWriter(path, dtype) as writer:
                for k in parts[j]:
                    writer.add_document(documents[k])
        paths.append(path)
    return sorted(paths)


def timed_pass(loader, tokens: int, min_seconds: float) -> dict:
    """Micro-batches of `loader` until at least `tokens` tokens and `min_seconds` s: tokens/s, and the process's CPU
    seconds (all its threads) per million tokens."""
    start, cpu, produced = time.perf_counter(), time.process_time(), 0
    while produced < tokens or time.perf_counter() - start < min_seconds:
        produced += next(loader)["input_ids"].numel()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": produced / elapsed, "cpu_s_per_mtoken": (time.process_time() - cpu) / produced * 1e6}


def measure_loader(cfg, tokenizer, batch: int, tokens: int, min_seconds: float, warm_rows: int,
                   inspect=None) -> tuple[dict, list[np.ndarray]]:
    """A loader built anew: the time from building it to its first micro-batch, then (after the untimed batches
    holding the first `warm_rows` rows, which fill its shuffle buffers) a `timed_pass`; `inspect(loader)` adds
    figures before it is closed. Returns the figures and the untimed rows, as (B, 2 * seq) batches. The loader's
    threads are waited for, so tokenizing it had in flight does not run into the next measurement."""
    start = time.perf_counter()
    loader = build_loader(cfg, tokenizer, batch, seed=0)
    try:
        rows = [batch_rows(next(loader))]
        first_batch = time.perf_counter() - start
        while len(rows) * batch < warm_rows:
            rows.append(batch_rows(next(loader)))
        figures = {**timed_pass(loader, tokens, min_seconds), "first_batch_s": first_batch}
        if inspect is not None:
            figures.update(inspect(loader))
    finally:
        loader.close()
        for thread in threading.enumerate():
            if thread.name.startswith(("data-prefetch", "tokenize")):
                thread.join(timeout=60)
    return figures, rows


def rows_differing(a: list[np.ndarray], b: list[np.ndarray], rows: int) -> tuple[int, int]:
    """(rows compared, tokens differing) between the first `rows` rows of two lists of (B, 2 * seq) batches."""
    a_rows = np.concatenate(a)[:rows] if a else np.zeros((0, 0), np.int64)
    b_rows = np.concatenate(b)[:rows] if b else np.zeros((0, 0), np.int64)
    n = min(len(a_rows), len(b_rows))
    return n, int((a_rows[:n] != b_rows[:n]).sum())


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="bench.py data", description="data pipeline vs raw tokenizer throughput, "
                                "pre-tokenized shards, a 3-source mixture, and data.shards 1/8/32")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or checkpoint dir (default: built-in BPE)")
    p.add_argument("--paths", nargs="*", default=[], help="JSON Lines / Parquet / text globs (default: built-in)")
    p.add_argument("--seq", type=int, default=2048, help="data.seq_len (default 2048)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--cache-dir", default="~/.cache/latentmoe", help="data.cache_dir: the built-in BPE and the "
                   "JSON Lines line indexes (default ~/.cache/latentmoe)")
    p.add_argument("--rounds", type=int, default=3, help="timed repetitions of every row (medians reported; "
                   "default 3)")
    p.add_argument("--max-mb", type=float, default=64, help="text measured (the corpus's first epoch, capped; "
                   "default 64)")
    p.add_argument("--shard-mb", type=float, default=8, help="text of the data.shards rows: the first documents "
                   f"of the measured text, at least {2 * max(SHARD_COUNTS)} of them (default 8)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="each timed pass runs at least this long, and "
                   "over at least the tokens of its corpus (default 3)")
    p.add_argument("--docs-per-chunk", type=int, default=DataConfig.docs_per_chunk,
                   help=f"data.docs_per_chunk (default {DataConfig.docs_per_chunk})")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    med = statistics.median
    # One canonical shard: its rows are the documents of the whole stream packed in order, which the parity check
    # below compares; the shard rows at the end measure more shards on the same documents.
    common = {"seq_len": args.seq, "cache_dir": args.cache_dir, "docs_per_chunk": args.docs_per_chunk}
    cfg = DataConfig(source="files" if args.paths else "stdlib", paths=list(args.paths), tokenizer=args.tokenizer,
                     shards=1, **common)
    tokenizer = build_tokenizer(cfg)
    # The documents of one epoch (up to --max-mb), in memory, for the raw measurement; the pipeline reads the same.
    texts, names, chars = [], [], 0
    for record in build_source(cfg, "train", seed=0, rank=0, world=1).records(Position()):
        if record.position.epoch > 0 or chars > args.max_mb * 2**20:
            break
        texts.append(record.payload)
        names.append(record.where)
        chars += len(record.payload)
    # Raw: the tokenizer alone over the in-memory texts, `rounds` times. Loaders (below): each round builds each
    # anew, draws untimed the batches that fill its shuffle buffer, then times a pass of at least the same number of
    # tokens and --min-seconds. Medians everywhere; a shared machine's slow spells move single measurements by 30%.
    raw: dict[str, list[float]] = {}
    fast = "encode_batch_fast" if hasattr(tokenizer.tokenizer, "encode_batch_fast") else "encode_batch"
    for _ in range(args.rounds):
        for name in dict.fromkeys(("encode_batch", fast)):
            start = time.perf_counter()
            n_tokens = sum(len(e.ids) for e in getattr(tokenizer.tokenizer, name)(texts))
            raw.setdefault(name, []).append(n_tokens / (time.perf_counter() - start))

    # Parity, exact. The same pipeline without its shuffle buffer must hand out the reference rows in order, inputs
    # and targets. The timed (shuffled) loader's first R - shuffle_buffer rows come from its first R packed rows, so
    # each must be a reference row, none more often than the reference holds it. Documents tokenized in pieces are
    # also compared with one call's ids of the whole text (reported: they may differ at the cuts).
    encodings = raw_encodings(tokenizer, texts)
    reference = packed_reference(tokenizer, texts, args.seq, encodings)  # (R, 2 * seq)
    pieced = whole_document_differences(tokenizer, names, texts, encodings)
    del encodings
    ordered = Pipeline(cfg, tokenizer, build_source(cfg, "train", seed=0, rank=0, world=1), args.batch, seed=0,
                       rank=0, shuffle=False).batches()
    mismatched, unshuffled = 0, []
    for start in range(0, len(reference), args.batch):
        expected = reference[start:start + args.batch]  # (b, 2 * seq)
        unshuffled.append(batch_rows(next(ordered)[0])[:len(expected)])
        mismatched += int((unshuffled[-1] != expected).sum())
    ordered.close()

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        folder = Path(tmp)
        # The same documents, each as `encode_documents` makes it, written once as indexed datasets over
        # INDEXED_FILES files in the order the loader reads them: the pre-tokenized stream is the on-the-fly one.
        encoded = tokenizer.encode_documents(texts)
        dtype = dtype_for_vocab(tokenizer.vocab_size)
        token_files = write_corpus(folder, "tokens", encoded, dtype)
        pretokenized_cfg = DataConfig(source="files", paths=[str(folder / "tokens-*.bin")], shards=1, **common)
        ordered = Pipeline(pretokenized_cfg, tokenizer, build_source(pretokenized_cfg, "train", seed=0, rank=0,
                                                                     world=1), args.batch, seed=0, rank=0,
                           shuffle=False).batches()
        pretokenized_unshuffled = [batch_rows(next(ordered)[0]) for _ in unshuffled]
        ordered.close()
        compared, pretokenized_mismatched = rows_differing(unshuffled, pretokenized_unshuffled, len(reference))
        del unshuffled, pretokenized_unshuffled

        # The corpus of the mixture's text source and of the shard rows: the first --shard-mb of the documents as
        # JSON Lines (read through the line index) and as indexed datasets, same files, same order.
        shard_docs, shard_chars = 0, 0
        while shard_docs < len(texts) and (shard_chars <= args.shard_mb * 2**20 or
                                           shard_docs < 2 * max(SHARD_COUNTS)):
            shard_chars += len(texts[shard_docs])
            shard_docs += 1
        if shard_docs < max(SHARD_COUNTS):
            raise SystemExit(f"bench.py data: {shard_docs} documents, fewer than data.shards={max(SHARD_COUNTS)} "
                             "of the shard rows; raise --max-mb")
        write_corpus(folder, "text", texts[:shard_docs])
        write_corpus(folder, "shard-tokens", encoded[:shard_docs], dtype)
        shard_tokens = sum(len(e) for e in encoded[:shard_docs])
        del encoded

        # On-the-fly, pre-tokenized and mixture loaders, alternated round by round so that a shared machine's slow
        # spells hit all three, each built anew per round: the untimed batches holding its first rows fill its
        # shuffle buffer (in the first round, the rows the shuffled parity checks), then a timed pass.
        half = len(token_files) // 2
        mixture = [MixtureSource(MIXTURE[0][0], [str(folder / "text-*.jsonl")], MIXTURE[0][1]),
                   MixtureSource(MIXTURE[1][0], [str(f) for f in token_files[:half]], MIXTURE[1][1]),
                   MixtureSource(MIXTURE[2][0], [str(f) for f in token_files[half:]], MIXTURE[2][1])]
        mixture_cfg = DataConfig(source="files", mixture=mixture, shards=1, **common)

        def blend_check(loader) -> dict:
            """The rows each source gave, against the largest-deficit-first counts of as many rows."""
            blend = Blend([w for _, w in MIXTURE])
            for _ in range(loader.global_rows):
                blend.next()
            return {"global_rows": loader.global_rows, "rows_by_source": loader.rows_by_source,
                    "expected_rows_by_source": dict(zip((name for name, _ in MIXTURE), blend.counts))}

        wanted = max(0, len(reference) - cfg.shuffle_buffer)
        fill = -(-cfg.shuffle_buffer // args.batch) * args.batch
        main_cfgs = {"on-the-fly": cfg, "pretokenized": pretokenized_cfg, "mixture": mixture_cfg}
        timings: dict[str, list[dict]] = {name: [] for name in main_cfgs}
        first_rows: dict[str, list[np.ndarray]] = {}
        for round_ in range(args.rounds):
            for name, main_cfg in main_cfgs.items():
                figures, rows = measure_loader(main_cfg, tokenizer, args.batch, n_tokens, args.min_seconds,
                                               max(fill, wanted if round_ == 0 else 0),
                                               blend_check if name == "mixture" else None)
                timings[name].append(figures)
                if round_ == 0 and name != "mixture":
                    first_rows[name] = rows

        # data.shards 1, 8 and 32 on the same documents in the same global order: JSON Lines tokenized on the fly
        # and the same documents pre-tokenized, each loader built anew per round.
        shard_kinds = {"on-the-fly": str(folder / "text-*.jsonl"), "pretokenized": str(folder / "shard-tokens-*.bin")}
        shard_rows: dict[tuple[str, int], list[dict]] = {}
        shard_first: dict[tuple[str, int], list[np.ndarray]] = {}
        for round_ in range(args.rounds):
            for shards in SHARD_COUNTS:
                for kind, glob in shard_kinds.items():
                    shard_cfg = DataConfig(source="files", paths=[glob], shards=shards, **common)
                    figures, rows = measure_loader(shard_cfg, tokenizer, args.batch, shard_tokens,
                                                   args.min_seconds, fill)
                    shard_rows.setdefault((kind, shards), []).append(figures)
                    if round_ == 0:
                        shard_first[(kind, shards)] = rows

    # ------------------------------------------------------------------------------------------ figures
    available = Counter(row.tobytes() for row in reference)
    unmatched = 0
    for row in np.concatenate(first_rows["on-the-fly"])[:wanted] if first_rows["on-the-fly"] else []:
        key = row.tobytes()
        unmatched += available[key] == 0
        available[key] -= 1
    shuffled_checked = min(wanted, sum(map(len, first_rows["on-the-fly"])))
    parity = {"rows_compared": len(reference), "tokens_compared": len(reference) * (args.seq + 1),
              "mismatched_tokens": mismatched, "shuffled_rows_checked": shuffled_checked,
              "shuffled_rows_unmatched": int(unmatched), "pieced_documents_differing_from_whole": pieced}
    shuffled_compared, shuffled_mismatched = rows_differing(first_rows["on-the-fly"], first_rows["pretokenized"],
                                                            wanted)
    rate = {name: med(t["tokens_per_s"] for t in timings[name]) for name in timings}
    best_raw = max(med(v) for v in raw.values())
    ratio = rate["on-the-fly"] / best_raw
    ratio_pretokenized = rate["pretokenized"] / rate["on-the-fly"]
    # every round's mixture loader against the blend's counts after as many rows
    mixture_mismatched = sum(abs(t["rows_by_source"][k] - v) for t in timings["mixture"]
                             for k, v in t["expected_rows_by_source"].items())
    mix = timings["mixture"][-1]
    shard_parity = {}
    for shards in SHARD_COUNTS:
        n_rows, differ = rows_differing(shard_first[("on-the-fly", shards)], shard_first[("pretokenized", shards)],
                                        fill)
        shard_parity[str(shards)] = {"rows_compared": n_rows, "mismatched_tokens": differ}
    shard_table = [{"kind": kind, "shards": shards,
                    **{key: med(r[key] for r in shard_rows[(kind, shards)])
                       for key in ("tokens_per_s", "first_batch_s", "cpu_s_per_mtoken")}}
                   for shards in SHARD_COUNTS for kind in shard_kinds]
    slowest = min((r for r in shard_table if r["kind"] == "pretokenized"), key=lambda r: r["tokens_per_s"])
    first_batch = {name: med(t["first_batch_s"] for t in timings[name]) for name in timings}
    results = {"documents": len(texts), "tokens": n_tokens, "pipeline_tokens_per_s": rate["on-the-fly"],
               **{f"raw_{k}_tokens_per_s": med(v) for k, v in raw.items()}, "ratio": ratio, "parity": parity,
               "pipeline_first_batch_s": first_batch["on-the-fly"],
               "pretokenized": {"files": len(token_files), "tokens_per_s": rate["pretokenized"],
                                "first_batch_s": first_batch["pretokenized"],
                                "cpu_s_per_mtoken": med(t["cpu_s_per_mtoken"] for t in timings["pretokenized"]),
                                "parity": {"rows_compared": compared, "tokens_compared": compared * (args.seq + 1),
                                           "mismatched_tokens": pretokenized_mismatched,
                                           "shuffled_rows_compared": shuffled_compared,
                                           "shuffled_mismatched_tokens": shuffled_mismatched}},
               "pipeline_cpu_s_per_mtoken": med(t["cpu_s_per_mtoken"] for t in timings["on-the-fly"]),
               "ratio_pretokenized": ratio_pretokenized,
               "mixture": {"sources": [{"name": m.name, "weight": m.weight, "paths": len(m.paths),
                                        "format": "jsonl" if m.name == MIXTURE[0][0] else "bin"} for m in mixture],
                           "shards": 1, "tokens_per_s": rate["mixture"], "first_batch_s": first_batch["mixture"],
                           "rounds_checked": len(timings["mixture"]), "global_rows": mix["global_rows"],
                           "rows_by_source": mix["rows_by_source"],
                           "expected_rows_by_source": mix["expected_rows_by_source"],
                           "mismatched_rows": mixture_mismatched},
               "shard_rows": {"documents": shard_docs, "tokens": shard_tokens, "files": INDEXED_FILES,
                              "rows": shard_table, "parity": shard_parity},
               "sustained": {"seq": V2_LITE_SEQ, "tokens_per_s": rate["pretokenized"],
                             "rows_per_s": rate["pretokenized"] / V2_LITE_SEQ,
                             "slowest_shards": slowest["shards"], "slowest_tokens_per_s": slowest["tokens_per_s"],
                             "slowest_rows_per_s": slowest["tokens_per_s"] / V2_LITE_SEQ}}

    print(f"data: {len(texts)} documents, {n_tokens:,} tokens, tokenizer {tokenizer.source}, "
          f"median of {args.rounds} rounds")
    for name, rates in raw.items():
        print(f"  raw tokenizer {name:18s} {med(rates):12,.0f} tokens/s")
    print(f"  pipeline (read, tokenize, pack, shuffle, batch) {rate['on-the-fly']:12,.0f} tokens/s")
    print(f"  ratio pipeline / fastest raw: {ratio:.2f}")
    print(f"  parity with the raw tokenizer: first {len(reference):,} unshuffled rows ({parity['tokens_compared']:,} "
          f"tokens), {mismatched} input or target tokens differ; first {shuffled_checked:,} shuffled "
          f"rows, {unmatched} not among those rows")
    for d in pieced:
        print(f"  note: {d['document']} ({d['characters']:,} characters) is tokenized in pieces of at most "
              f"{PIECE_CHARS:,} cut as specified (the reference does the same): {d['tokens']:,} tokens "
              f"against {d['whole_tokens']:,} for one call on the whole text, the first difference at token "
              f"{d['first_difference']:,}")
    print(f"  pipeline, pre-tokenized (.bin/.idx, {len(token_files)} files) {rate['pretokenized']:12,.0f} tokens/s")
    print(f"  parity pre-tokenized vs on-the-fly: first {compared:,} unshuffled rows "
          f"({compared * (args.seq + 1):,} tokens), {pretokenized_mismatched} input or target tokens differ; first "
          f"{shuffled_compared:,} shuffled rows, {shuffled_mismatched} tokens differ")
    print(f"  ratio pretokenized / on-the-fly tokens/s: {ratio_pretokenized:.2f}x")
    print(f"  mixture {' / '.join(f'{m.name} {m.weight}' for m in mixture)} ({mixture[0].name}: JSON Lines "
          f"tokenized on the fly; {mixture[1].name}, {mixture[2].name}: halves of the .bin files) "
          f"{rate['mixture']:12,.0f} tokens/s")
    print(f"  mixture rows by source after {mix['global_rows']:,} rows: {mix['rows_by_source']}; largest-deficit-"
          f"first counts {mix['expected_rows_by_source']}: {mixture_mismatched} rows differ over "
          f"{len(timings['mixture'])} rounds")
    print(f"  sustained per process, pre-tokenized: {rate['pretokenized']:,.0f} tokens/s (data.shards=1; slowest "
          f"shard row {slowest['tokens_per_s']:,.0f} at data.shards={slowest['shards']}) = "
          f"{rate['pretokenized'] / V2_LITE_SEQ:,.0f} rows/s ({slowest['tokens_per_s'] / V2_LITE_SEQ:,.0f}) of "
          f"{V2_LITE_SEQ:,} tokens, V2-Lite's sequence length: a step of r such rows waits on the loader only if it "
          f"takes less than r / {slowest['tokens_per_s'] / V2_LITE_SEQ:,.0f} s")
    taken = f"the first {args.shard_mb:g} MB" if shard_docs < len(texts) else "all"
    print(f"data.shards rows: {shard_docs} documents ({taken} of the above), {shard_tokens:,} tokens, median of "
          f"{args.rounds} rounds, each loader built anew")
    print(f"  on-the-fly: {INDEXED_FILES} JSON Lines files, each shard reading its own lines through the line index; "
          f"pre-tokenized: the same documents in {INDEXED_FILES} .bin/.idx files; same global order")
    print(f"  the shuffle buffer ({cfg.shuffle_buffer} rows) is split over the shards; first batch: from building "
          "the loader to its first micro-batch; CPU: the process's, all threads")
    print(f"  {'data.shards':>11s}  {'on-the-fly tokens/s':>19s} {'first batch':>11s} {'CPU s/Mtok':>10s}   "
          f"{'pre-tokenized tokens/s':>22s} {'first batch':>11s} {'CPU s/Mtok':>10s}")
    for shards in SHARD_COUNTS:
        cells = []
        for kind, width in (("on-the-fly", 19), ("pretokenized", 22)):
            r = next(r for r in shard_table if (r["kind"], r["shards"]) == (kind, shards))
            cells.append(f"{r['tokens_per_s']:{width},.0f} {r['first_batch_s']:10.3f}s {r['cpu_s_per_mtoken']:10.3f}")
        print(f"  {shards:11d}  {cells[0]}   {cells[1]}")
    print("  parity on-the-fly vs pre-tokenized, first rows at each data.shards: " + "; ".join(
        f"{s}: {v['rows_compared']:,} rows, {v['mismatched_tokens']} tokens differ" for s, v in shard_parity.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
