"""Tokenize text corpora once into Megatron `.bin/.idx` shards, which training then reads without tokenizing.

    python launch/tokenize.py '/data/web/*.jsonl' --out /data/web-tok                 # the built-in BPE
    python launch/tokenize.py /data/corpus --out /data/tok --tokenizer /ckpt/DeepSeek-V2-Lite --workers 8
    python launch/pretrain.py data=files 'data.paths=[/data/tok/*.bin]' data.tokenizer=/ckpt/DeepSeek-V2-Lite

Inputs are globs or directories, expanded as `data.paths` is (JSON Lines, Parquet, text files; docs/data.md#sources).
Each input file becomes one `.bin/.idx` pair in --out, named `<index>-<its path below the inputs' common folder,
'/' -> '__'>.bin`, so the shards sort in the order of the inputs: training on `DIR/*.bin` reads the documents in the
order training on the input globs reads them, and each stored document is exactly what training would have made of
its record (`TextTokenizer.encode_documents`: the tokenizer's own special tokens, then EOS). Bad records (malformed
JSON, a missing field, an empty line, ...) are skipped, as training skips them: counted by reason, the first ones
printed with file:line, none stored.

Without --tokenizer the job uses the same default as training: the built-in byte-level BPE of --vocab-size trained
once on the built-in corpus and cached in --cache-dir (data.vocab_size and data.cache_dir of a run). The tokenizer
is recorded in DIR/manifest.json with every shard's input file (size, mtime), documents, tokens, bad records and
largest token id; training refuses shards made with another tokenizer.

--workers processes tokenize one input file each at a time; a progress bar (on a terminal) shows the files done,
tokens and tokens/s, a line per finished file follows, and the summary ends with the training overrides to use.

Run it again with the same inputs to resume or update: a shard is kept when its .idx exists (a shard takes its final
.idx name only once complete) and its input still has the size and mtime its manifest entry records; the others (an
input that changed, a shard an interrupted run did not finish) are tokenized again, and the temporary files of an
interrupted run are removed. The manifest is rewritten as shards finish, so an interrupted run keeps what it finished.

A run refuses, unless --overwrite: a DIR whose shards were made with another tokenizer or --text-field, and a DIR
holding .bin/.idx files that are not outputs of these inputs (training on DIR/*.bin would read them too).
--overwrite re-tokenizes every input and removes those files.

Errors you can fix (a glob matching nothing, an unreadable tokenizer, a Parquet file without the column, an input
with no usable record) print one `tokenize error: ...` line and exit with status 2; the other inputs' shards are
still written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import fcntl
import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np
from tqdm import tqdm

from data.config import DataConfig
from data.indexed import IndexedWriter, dtype_for_vocab, pair_paths
from data.manifest import MANIFEST, describe_tokenizer, read_manifest, same_tokenizer, write_manifest
from data.sources import (INDEXED_SUFFIXES, MAX_EXAMPLES, TEXT_SUFFIXES, DataError,
                          FileSource, Position, expand_globs, text_extractor)
from data.tokenizer import TextTokenizer, load_tokenizer

JOB_VERSION = 1
"""Bumped when the job would store other tokens for the same input and tokenizer: shards of another version are
tokenized again."""
BATCH = 256
"""Records per `encode_documents` call (the stored documents do not depend on it)."""
PROGRESS_EVERY = 4096
"""Records between two progress reports of a worker."""
MANIFEST_EVERY_S = 5.0
"""The manifest is rewritten at most this often while shards finish (and at the end), so an interrupted run keeps
what it finished without rewriting a large manifest per shard."""
LOCK = ".tokenize.lock"


class JobError(Exception):
    """A problem the user can fix: printed as one `tokenize error:` line, exit status 2."""


# ---------------------------------------------------------------------------------------------- inputs and names
def find_inputs(patterns: list[str], out: Path) -> list[Path]:
    """The input files in `data.paths` order (absolute), without the job's own outputs under `out`."""
    files = [p.resolve() for p in expand_globs(patterns, key="INPUT")]
    files = list(dict.fromkeys(p for p in files if out not in p.parents))
    if not files:
        raise JobError(f"the inputs {patterns} hold no file outside --out {out}")
    for path in files:
        if path.suffix.lower() in INDEXED_SUFFIXES:
            raise JobError(f"{path} is already a tokenized .bin/.idx dataset: train on it directly (data.paths)")
    return files


def shard_names(files: list[Path]) -> list[str]:
    """The output prefix of each input: its index in the input order (zero-padded, so names sort in that order)
    and its path below the inputs' common folder with '/' -> '__' (for a reader). The index alone makes the names
    unique; the path part is cut from the left to keep a name within the usual 255-byte file-name limit."""
    parent = Path(os.path.commonpath([str(p.parent) for p in files]))
    width = max(5, len(str(len(files) - 1)))
    names = []
    for i, path in enumerate(files):
        flat = "__".join(path.relative_to(parent).parts)
        while len(f"{i:0{width}d}-{flat}.bin".encode()) > 250:
            flat = flat[1:]
        names.append(f"{i:0{width}d}-{flat}")
    return names


# ---------------------------------------------------------------------------------------------- one input file
def tokenize_file(task: dict, tokenizer: TextTokenizer, report: Callable[[int, int], None]) -> dict:
    """Writes the shard of one input file; returns its manifest entry. `report(tokens, documents)` is called every
    `PROGRESS_EVERY` records and at the end, with what was added since its last call."""
    path, prefix, field = Path(task["input"]), Path(task["prefix"]), task["text_field"]
    before = path.stat()
    start = time.perf_counter()
    source = FileSource([path], text_extractor(field), field, seed=0, rank=0, world=1, shuffle_files=False)
    bad = source.bad  # counted in the first pass only: once each
    whole_file = path.suffix.lower() in TEXT_SUFFIXES  # one record at most: stop there rather than read it again
    documents = tokens = 0
    max_id = -1
    unreported = [0, 0, 0]  # tokens, documents, records since the last report

    def add(writer: IndexedWriter, texts: list[str]) -> None:
        nonlocal documents, tokens, max_id, unreported
        for ids in tokenizer.encode_documents(texts):
            writer.add_document(ids)
            documents, tokens = documents + 1, tokens + len(ids)
            max_id = max(max_id, int(ids.max())) if len(ids) else max_id
            unreported[0] += len(ids)
            unreported[1] += 1
        unreported[2] += len(texts)
        if unreported[2] >= PROGRESS_EVERY:
            report(unreported[0], unreported[1])
            unreported = [0, 0, 0]
        texts.clear()

    with IndexedWriter(prefix, np.dtype(task["dtype"])) as writer:
        batch: list[str] = []
        try:
            for record in source.records(Position()):
                if record.position.epoch > 0:  # the first record of the second pass: the file is done
                    break
                batch.append(record.payload)
                if len(batch) == BATCH:
                    add(writer, batch)
                if whole_file:
                    break
        except DataError as e:
            if "no usable record" not in str(e):  # a Parquet file without the column, an unreadable file
                raise DataError(str(e).replace("set data.text_field (or data.messages_field for SFT)", "set "
                                               "--text-field").replace("data.text_field", "--text-field")) from None
            if not bad.bad:
                raise DataError(f"{path}: no usable record (the file holds no record)") from None
            hint = "; is --text-field right?" if any(r.startswith("missing field") for r in bad.counts) else ""
            raise DataError(f"{path}: no usable record ({bad.bad} skipped: {dict(bad.counts)}; first: "
                            f"{bad.examples[:3]}){hint}") from None
        add(writer, batch)
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise DataError(f"{path}: changed while it was being tokenized; run the job again once it is written")
    report(unreported[0], unreported[1])
    return {"source": str(path), "source_size": before.st_size, "source_mtime_ns": before.st_mtime_ns,
            "documents": documents, "tokens": tokens, "bad_records": bad.bad, "bad_reasons": dict(bad.counts),
            "bad_examples": list(bad.examples), "max_token_id": max_id if max_id >= 0 else None,
            "dtype": np.dtype(task["dtype"]).name, "seconds": round(time.perf_counter() - start, 3)}


def run_task(task: dict, tokenizer: TextTokenizer, report: Callable[[int, int], None]) -> dict:
    """`tokenize_file`, with the input's own problems (no usable record, a Parquet file without the column, an
    unreadable file) returned as an error for that file instead of raised."""
    try:
        return {"index": task["index"], "entry": tokenize_file(task, tokenizer, report)}
    except DataError as e:
        return {"index": task["index"], "error": str(e)}
    except OSError as e:
        return {"index": task["index"], "error": f"{task['input']}: {e.strerror or e}"}


# Worker processes: each loads the tokenizer itself from its file and sends progress through a queue.
_worker: dict = {}


def _init_worker(tokenizer_path: str, identity: dict, progress, threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which ends the workers
    os.environ["RAYON_NUM_THREADS"] = str(threads)  # the tokenizer's thread pool: the cores shared by the workers
    _worker["progress"] = progress
    try:
        tokenizer = load_tokenizer(tokenizer_path)
        if not same_tokenizer(tokenizer.identity(), identity):
            raise ValueError(f"{tokenizer_path} changed while the job ran")
        _worker["tokenizer"] = tokenizer
    except ValueError as e:  # raised per task, where the main process reports it
        _worker["error"] = str(e)


def _work(task: dict) -> dict:
    if "error" in _worker:
        raise JobError(f"worker tokenizer: {_worker['error']}")
    index = task["index"]
    return run_task(task, _worker["tokenizer"], lambda tokens, docs: _worker["progress"].put((index, tokens, docs)))


# ---------------------------------------------------------------------------------------------- the job
def load_job_tokenizer(args: argparse.Namespace) -> TextTokenizer:
    if args.tokenizer:
        try:
            return load_tokenizer(Path(args.tokenizer).expanduser().resolve())  # named by an absolute path
        except ValueError as e:
            raise JobError(str(e).replace("data.tokenizer", "--tokenizer")) from None
    from data.loader import build_tokenizer  # imports torch: only for the built-in BPE

    return build_tokenizer(DataConfig(vocab_size=args.vocab_size, cache_dir=args.cache_dir))


def lock_directory(out: Path):
    """An exclusive lock on --out for the job's lifetime: two jobs writing one directory would remove each other's
    temporary files."""
    handle = open(out / LOCK, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise JobError(f"another tokenize job is writing {out} (it holds {out / LOCK}); wait for it or use "
                       "another --out") from None
    return handle


def remove_pair(prefix: Path) -> None:
    """Removes a shard, its .idx first: a .bin without its .idx never looks finished."""
    bin_path, idx_path = pair_paths(prefix)
    idx_path.unlink(missing_ok=True)
    bin_path.unlink(missing_ok=True)


def plan(args: argparse.Namespace, out: Path, files: list[Path], names: list[str], settings: dict,
         tokenizer: TextTokenizer) -> tuple[dict[str, dict], list[int], int]:
    """(entries of the shards kept, indices of the inputs to tokenize, temporaries removed). Refuses (JobError)
    what would mix shards of other settings or other inputs into DIR, unless --overwrite."""
    try:
        manifest = read_manifest(out)
    except DataError:
        if not args.overwrite:
            raise
        manifest = None
    old = manifest["shards"] if manifest else {}
    if manifest and old and not args.overwrite:
        made_with, old_settings = manifest["tokenizer"], manifest.get("settings", {})
        if not same_tokenizer(made_with, tokenizer.identity()):
            raise JobError(f"{out} holds shards tokenized with {describe_tokenizer(made_with)}, not with "
                           f"{describe_tokenizer(tokenizer.identity())}; give that --tokenizer, another --out, or "
                           "--overwrite to re-tokenize everything")
        if old_settings.get("text_field") != settings["text_field"]:
            raise JobError(f"{out} holds shards made from the field {old_settings.get('text_field')!r}, not "
                           f"{settings['text_field']!r}; give that --text-field, another --out, or --overwrite")
    ours = {f"{name}{suffix}" for name in names for suffix in (".bin", ".idx")}
    foreign = sorted(p for p in out.iterdir() if p.suffix in (".bin", ".idx") and p.name not in ours)
    if foreign and not args.overwrite:
        listed = [f"{p.name} (from {old[p.name]['source']})" if p.name in old else p.name for p in foreign[:3]]
        raise JobError(f"{out} holds {len(foreign)} .bin/.idx file(s) that are not outputs of these inputs (e.g. "
                       f"{', '.join(listed)}); training on {out}/*.bin would read them too: give the same inputs as "
                       "before, another --out, or --overwrite to remove them")
    for path in sorted(foreign, key=lambda p: p.suffix != ".idx"):  # the .idx files first, as in remove_pair
        path.unlink()
    stale = remove_temporaries(out)  # an interrupted run's: the directory lock says no job is writing them now
    same_version = manifest is not None and manifest.get("settings", {}).get("job_version") == JOB_VERSION
    kept, todo = {}, []
    for i, (path, name) in enumerate(zip(files, names)):
        entry = old.get(f"{name}.bin")
        if not args.overwrite and same_version and entry and shard_is_current(out / name, path, entry):
            kept[f"{name}.bin"] = entry
        else:
            remove_pair(out / name)
            todo.append(i)
    return kept, todo, stale


def remove_temporaries(out: Path) -> int:
    """Removes the temporary files of shards and of the manifest in `out` (call it holding the lock, with no
    worker running); returns how many there were."""
    stale = [p for p in out.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")
             and (".bin." in p.name or ".idx." in p.name or p.name.startswith(f".{MANIFEST}."))]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def shard_is_current(prefix: Path, source: Path, entry: dict) -> bool:
    """Whether the finished shard `prefix` was made from `source` as it is now."""
    bin_path, idx_path = pair_paths(prefix)
    if not idx_path.is_file() or not bin_path.is_file() or entry.get("source") != str(source):
        return False
    stat = source.stat()
    try:
        size = entry["tokens"] * np.dtype(entry["dtype"]).itemsize
    except (KeyError, TypeError):
        return False
    return (stat.st_size, stat.st_mtime_ns) == (entry.get("source_size"), entry.get("source_mtime_ns")) \
        and bin_path.stat().st_size == size


def summarize_bad(entries: list[dict]) -> list[str]:
    """A line per reason and the file:line of the first `MAX_EXAMPLES` bad records, over the shards in order."""
    counts, examples = Counter(), []
    for entry in entries:
        counts.update(entry.get("bad_reasons", {}))
        examples += entry.get("bad_examples", [])
    if not counts:
        return []
    total = sum(counts.values())
    lines = [f"bad records: {total:,} skipped (not stored), by reason:"]
    lines += [f"  {n:,}  {reason}" for reason, n in counts.most_common()]
    lines += [f"  {where}" for where in examples[:MAX_EXAMPLES]]
    if total > len(examples[:MAX_EXAMPLES]):
        lines.append(f"  ... and {total - len(examples[:MAX_EXAMPLES]):,} more (counted, not listed)")
    return lines


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out} is a file, not a directory")
    files = find_inputs(args.inputs, out)
    tokenizer = load_job_tokenizer(args)
    identity = tokenizer.identity()
    settings = {"text_field": args.text_field, "tokenizer": identity, "job_version": JOB_VERSION}
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_directory(out)
    try:
        names = shard_names(files)
        kept, todo, stale = plan(args, out, files, names, settings, tokenizer)
        shards = dict(kept)
        write_manifest(out, identity, shards, settings)
        print(f"tokenize: {len(files)} input file(s) -> {out} with {describe_tokenizer(identity)}; "
              f"{len(kept)} shard(s) kept from an earlier run, {len(todo)} to tokenize"
              + (f"; removed {stale} temporary file(s) of an interrupted run" if stale else ""), flush=True)
        dtype = dtype_for_vocab(tokenizer.vocab_size).name
        tasks = [{"index": i, "input": str(files[i]), "prefix": str(out / names[i]), "text_field": args.text_field,
                  "dtype": dtype} for i in todo]
        tasks.sort(key=lambda t: -Path(t["input"]).stat().st_size)  # the largest first: the workers end together
        began = time.perf_counter()
        try:
            failures, tokens_now = execute(tasks, tokenizer, args.workers, out, shards, settings, len(kept),
                                           len(files))
        finally:  # also on an interrupt: what finished is recorded, the unfinished shards' temporaries removed
            write_manifest(out, identity, shards, settings)
            remove_temporaries(out)
        tokenizing = time.perf_counter() - began
    finally:
        lock.close()
    seconds = time.perf_counter() - start
    entries = [shards[f"{n}.bin"] for n in names if f"{n}.bin" in shards]
    for line in summarize_bad(entries):
        print(line)
    documents, tokens = sum(e["documents"] for e in entries), sum(e["tokens"] for e in entries)
    print(f"done: {len(entries)}/{len(files)} files ({len(kept)} kept), {documents:,} documents, {tokens:,} tokens, "
          f"{sum(e['bad_records'] for e in entries):,} bad records; {seconds:.1f} s, {tokens_now:,} tokens "
          f"tokenized in {tokenizing:.1f} s = {tokens_now / max(tokenizing, 1e-9):,.0f} tokens/s")
    if failures:
        more = f" (and {len(failures) - 1} more input file(s), listed above)" if len(failures) > 1 else ""
        rest = "; the other inputs' shards are written, and a rerun keeps them" if entries else ""
        print(f"tokenize error: {failures[0]}{more}{rest}", file=sys.stderr)
        return 2
    overrides = [f"'data.paths=[{out}/*.bin]'"]
    if args.tokenizer:
        overrides.append(f"data.tokenizer={Path(args.tokenizer).expanduser().resolve()}")
    else:  # the built-in BPE: the same data.vocab_size (and cache) as the training run
        defaults = DataConfig()
        if args.vocab_size != defaults.vocab_size:
            overrides.append(f"data.vocab_size={args.vocab_size}")
        if args.cache_dir != defaults.cache_dir:
            overrides.append(f"data.cache_dir={args.cache_dir}")
    print(f"  shards    {out}/*.bin  (manifest {out / MANIFEST})")
    print(f"  train on them: python launch/pretrain.py data=files {' '.join(overrides)}")
    return 0


def execute(tasks: list[dict], tokenizer: TextTokenizer, workers: int, out: Path, shards: dict, settings: dict,
            kept: int, total_files: int) -> tuple[list[str], int]:
    """Runs the tasks (in this process with one worker, else in a pool of spawned processes), recording each
    finished shard in `shards` and the manifest; returns (the failed inputs' errors, tokens written)."""
    identity = settings["tokenizer"]
    failures: list[str] = []
    bar = tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, disable=None, desc=f"files {kept}/{total_files}")
    state = {"done": kept, "tokens": 0, "saved": time.monotonic()}
    by_index = {t["index"]: t for t in tasks}

    def progress(tokens: int, documents: int) -> None:
        bar.update(tokens)

    def finished(result: dict) -> None:
        task = by_index[result["index"]]
        state["done"] += 1
        bar.set_description(f"files {state['done']}/{total_files}")
        if "error" in result:
            failures.append(result["error"])
            bar.write(f"[{state['done']}/{total_files}] failed: {result['error']}")
            return
        entry = result["entry"]
        shards[Path(task["prefix"]).name + ".bin"] = entry
        state["tokens"] += entry["tokens"]
        bar.write(f"[{state['done']}/{total_files}] {task['input']}: {entry['documents']:,} documents, "
                  f"{entry['tokens']:,} tokens, {entry['bad_records']:,} bad records, {entry['seconds']:.1f} s")
        if time.monotonic() - state["saved"] >= MANIFEST_EVERY_S:
            write_manifest(out, identity, shards, settings)
            state["saved"] = time.monotonic()

    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                finished(run_task(task, tokenizer, progress))
        else:
            run_pool(tasks, tokenizer, min(workers, len(tasks)), progress, finished)
    finally:
        bar.close()
    return failures, state["tokens"]


def run_pool(tasks: list[dict], tokenizer: TextTokenizer, workers: int, progress, finished) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a process whose tokenizer threads already ran
    updates = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    identity = tokenizer.identity()

    def drain() -> None:
        while True:
            try:
                _, tokens, documents = updates.get_nowait()
            except queue.Empty:
                return
            progress(tokens, documents)

    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(tokenizer.source, identity, updates, threads))
    try:
        pending = {pool.submit(_work, task) for task in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for future in done:
                finished(future.result())
    except BaseException:  # an interrupt, or a worker's failure: end the others now rather than let them finish
        stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminates the worker processes. Their unfinished shards stay under temporary names, never mistaken for
    finished ones, and the next run removes them."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
    else:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = DataConfig()
    p = argparse.ArgumentParser(prog="launch/tokenize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="globs or directories of .jsonl/.json/.ndjson, .parquet or .txt/.md/.text/.py/.rst files "
                        "(quote globs); the files are taken in data.paths order")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: one <index>-<input path>.bin/.idx pair per input file and manifest.json")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json or a directory holding one (data.tokenizer); default: the built-in BPE that "
                        "training uses when data.tokenizer is unset")
    p.add_argument("--vocab-size", type=int, default=defaults.vocab_size, metavar="N",
                   help="vocabulary of the built-in BPE, as data.vocab_size (default %(default)s; without --tokenizer)")
    p.add_argument("--cache-dir", default=defaults.cache_dir, metavar="DIR",
                   help="where the built-in BPE is cached, as data.cache_dir (default %(default)s)")
    p.add_argument("--text-field", default=defaults.text_field, metavar="F",
                   help="JSON Lines field / Parquet column holding the text, as data.text_field (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="processes tokenizing input files in parallel, one file each at a time (default: "
                        "min(4, CPU count) = %(default)s; 1 runs in this process)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-tokenize every input even if its shard is finished, and remove .bin/.idx files in DIR "
                        "that are not outputs of these inputs; needed when DIR was made with another tokenizer or "
                        "--text-field")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (JobError, DataError) as e:
        print(f"tokenize error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokenize: interrupted; finished shards are kept, run the same command again to resume",
              file=sys.stderr)
        return 130

