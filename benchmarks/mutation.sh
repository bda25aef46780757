#!/usr/bin/env bash
# Mutation score of segrun's core modules with mutmut 3 (`pip install -e '.[mutation]'`).
#
# Dev tooling, not part of CI: every mutant is a forked pytest run of the tests not marked slow that
# reach the mutated function ([tool.mutmut] in pyproject.toml names both), about 0.3-1 mutants per
# second on one core. Results accumulate in mutants/ (git-ignored): a second run only tests the
# mutants not tested yet; `rm -rf mutants` starts over.
#
#   benchmarks/mutation.sh                      every core module (about 2100 mutants: an hour or more)
#   benchmarks/mutation.sh segrun.metrics ...   only these modules
#   JOBS=2 benchmarks/mutation.sh               parallel test runs (default 1, niced)
#   SAMPLE=60 benchmarks/mutation.sh ...        60 random untested mutants per module: a whole-module estimate
#   RERUN=1 benchmarks/mutation.sh ...          only the survivors not listed as equivalent (after adding tests)
#   REPORT_ONLY=1 benchmarks/mutation.sh        the table of the results so far, running nothing
#   mutmut show <mutant name>                   the diff of one survivor
#
# benchmarks/mutation_results.py reads the results (the sample, the open survivors, the table).
# It prints, per module and in total: mutants tested, killed (a test failed), timeouts (counted as
# killed: the mutant hung the code), survivors, mutants no test reaches, and the score
# (killed + timeouts) / tested. Survivors judged equivalent (no behaviour tells them apart) are listed with
# the reason in benchmarks/mutation_equivalents.txt; the table counts them apart from the open ones.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mutmut >/dev/null || { echo "error: mutmut is not installed (pip install -e '.[mutation]')" >&2; exit 2; }

# a forked child that inherits a busy OpenMP pool can deadlock: one thread per test process
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# each mutant's forked pytest run leaves a basetemp that pytest's own cleanup keeps (its lock is never released):
# about 66 GB in /tmp over 7,000 mutants filled the disk once; keep them under mutants/tmp, removed after the run
export PYTEST_DEBUG_TEMPROOT="$PWD/mutants/tmp"
JOBS=${JOBS:-1}
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(segrun.metrics segrun.schedulers segrun.optim segrun.engine.monitor segrun.engine.checkpoint segrun.engine.checkpointer
             segrun.engine.predict segrun.data.loader segrun.data.cityscapes segrun.data.coco_stuff
             segrun.data.ade20k segrun.data.transforms segrun.losses
             segrun.engine.trainer segrun.engine.settings segrun.build segrun.job segrun.engine.status segrun.sweep
             segrun.report segrun.engine.trust segrun.eval segrun.export segrun.engine.preempt segrun.class_weights
             segrun.data.bad_samples segrun.checks)
fi
mkdir -p mutants "$PYTEST_DEBUG_TEMPROOT"
if [ "${REPORT_ONLY:-0}" != 1 ]; then
    TARGETS=()
    if [ -n "${SAMPLE:-}" ]; then
        # up to $SAMPLE mutants per module drawn at random (seeded) from those not tested yet: a whole-module
        # estimate in minutes where every mutant would take hours (needs one earlier run that generated them)
        mutmut results --all true > mutants/results.txt 2>/dev/null
        mapfile -t TARGETS < <(python3 benchmarks/mutation_results.py sample "$SAMPLE" "${MODULES[@]}")
        printf '%s\n' "${TARGETS[@]}" | grep . > mutants/sampled.txt || true
        echo "mutmut run over $(wc -l < mutants/sampled.txt) sampled mutants of ${MODULES[*]} (log: mutants/run.log)" >&2
        mapfile -t TARGETS < mutants/sampled.txt
    elif [ "${RERUN:-0}" = 1 ]; then
        mutmut results --all true > mutants/results.txt 2>/dev/null
        mapfile -t TARGETS < <(python3 benchmarks/mutation_results.py open "${MODULES[@]}")
        echo "mutmut run over the ${#TARGETS[@]} open survivors of ${MODULES[*]} (log: mutants/run.log)" >&2
    else
        for module in "${MODULES[@]}"; do TARGETS+=("$module.*"); done
        echo "mutmut run over ${MODULES[*]} (log: mutants/run.log)" >&2
    fi
    [ ${#TARGETS[@]} -eq 0 ] || nice -n 10 mutmut run --max-children "$JOBS" "${TARGETS[@]}" > mutants/run.log 2>&1 || true
    rm -rf "$PYTEST_DEBUG_TEMPROOT"
fi

mutmut results --all true > mutants/results.txt 2>/dev/null
python3 benchmarks/mutation_results.py table "${MODULES[@]}"

# ---------------------------------------------------------------------------------------------------
# NOTES (numeric core): the last run gives 2661 mutants, 2494 killed, 165 survivors, 2 without tests (93.7%).
# Checkpoint and loader were rerun after fast unit tests for checkpoint's write_failure,
# prune_epoch_checkpoints, _few, load_model_state, all_finite, umask_mode, state_tensors, pad_collate's
# bad-sample path and EpochSampler's mid-epoch start were added (before, only tests/test_faults.py
# reached most of them; it is left out of the mutation set for its 40 s): every survivor in those two
# modules is listed below as equivalent, with the reason. The other modules' survivors were triaged at
# the 94.0% run (2468 mutants); any that code merged since added there are not triaged yet. The
# three listed last are known gaps, not equivalents.
#
# OpenCV / torch defaults spelled out (removing or nulling the argument changes nothing):
#   transforms.warp: flags=None, borderMode=None or omitted (INTER_LINEAR / BORDER_CONSTANT are the
#     defaults); GaussianBlur ksize None == (0, 0); Normalize's dtype=None (float32 is the default)
#     and view(-1, 1, 1) (broadcasts the same against N x C x H x W); metrics' nan/float64 dtype
#     (promoted by torch.where); checkpoint weights_only=None or omitted (True by default since
#     torch 2.6); loader _worker_init setNumThreads(None|1) (both mean one thread; the two
#     "no tests" mutants: no fast test starts a worker process); the numpy RNG key as float64
#     (holds every uint32 exactly) or left int64 on the way back (numpy accepts it).
# Needs a device or a process group this CPU-only test set does not have:
#   device=None / omitted for buffers in predict._slide and ConfusionMatrix (CPU is the default);
#   ConfusionMatrix "auto" -> scatter on CUDA and all_reduce(None); the CUDA RNG branches of
#   checkpoint.rng_state / set_rng_state (tests/test_distributed.py and benchmarks/gpu_check.sh).
# Draws and comparisons of probability zero:
#   rng.integers(n) == rng.integers(0, n) (the same draw); `random() <= p` for `< p`; a last,
#   unused draw when blur=0 (`blur >= 0`, `blur > 0 or ...`).
# Unused rows, dead branches, over-long slices:
#   the flip matrix's bottom row (only m[:2] is returned); label.shape[:3] of a 2-D label;
#   _fill_tuple slicing vals[:4] vs vals[:5] for <= 4 channels (cv2 reads one value per channel);
#   warp's per-channel path for exactly 4 channels (same result as one call); ValTransform's fill,
#   ignore value and channel count (the centre crop lies inside the image: nothing is padded);
#   pad_collate's shape[+2:]/[-3:] (only skips the no-padding fast path) and batch[1] dtype (one
#   dtype per batch); EpochSampler padding with world_size >= 1 and ceil(total * size)
#   (sliced to the same length), its __len__ with world_size >= 1 (ceil(size / 1) == size);
#   predict's x.shape[+2:] on a 4-D tensor; metrics n = shape[1] and class_metrics' names from
#   shape[1] (square matrix), `total >= 0` / `or True` where 0 / 0 already gives NaN, Dice's
#   clamp(min=2) (gt + pred == 1 means tp == 0, so 0 / 1 == 0 / 2); _nanmean `or True`
#   (mean of nothing is NaN too); scheduler `warmup_iters >= 0` (0 >= total is refused earlier),
#   `it <= warmup_iters` (the warmup factor is 1 at the end either way) and super().__init__
#   without last_epoch (-1 is the default); ADE20K {1: ignore} (overwritten by the k -> k-1 entries,
#   0 falls back to the fill, which is the ignore value); Cityscapes check=None (no invalid ids).
# Performance-only choices (same numbers, different batching):
#   predict._share_flip (whether the flipped view shares the forward pass) and the slide window
#   batch size (max(2, ...), `len(chunk) >= 1`, window_batch dropped): the reference tests pass
#   on every path.
# Messages cut at 120/200 characters ([:121], [:201]), rfind/lstrip/rstrip(None) on a message that
#   holds the phrase once and does not end in '.'; the EpochSampler seed mix (seed * 100004 + epoch,
#   seed * 100003 - epoch): any injective mix of (seed, epoch) gives the same guarantees, the exact
#   permutation is not a promise.
# Losses: SegLoss's own defaults (every subclass passes its ignore_index and aux_weight);
#   labels_checked never set (the label range is checked on every call: slower, same result);
#   register_buffer(persistent=None) (falsy, like False); .to(None) on masks and one-hots (the
#   default float dtype, or bool that multiplies the same); clamp_min(1.000000000001) where the
#   numerator is 0 whenever the denominator is below 1 (Dice with smooth, OHEM without weights below
#   1); OHEM's ignored pixels at 3.0 instead of 2.0 (any value above 1 sorts last) and `prob <=
#   thresh`; Lovasz's arange/cat defaults (device, dim 0) and `has.sum() >= 0` (the mean of nothing is
#   0 / 1 already); CombinedLoss's shape check with ignore None (only the shapes are used there);
#   CrossEntropyLoss without label_smoothing passed when it is 0.
# Checkpoint long-run helpers: save_checkpoint `tmp = ""` for None (os.unlink("") raises the
#   FileNotFoundError that is ignored anyway); umask_mode os.umask(1) for os.umask(0) (the mask set
#   for the query is replaced at once, the old mask returned is the same); all_finite's group key
#   None (CPU's _foreach_norm takes mixed dtypes in one list; the dtype/device grouping is for the
#   fused CUDA kernel and for tensors on several devices), float("INF") (== inf) and .to(None) of
#   the flags (one device on CPU); prune_epoch_checkpoints `keep_last < 0` (with 0, found[:-0] is
#   empty: nothing is removed either way).
#
# Not equivalent, not killed (known gaps):
#   losses LovaszSoftmaxLoss `used.sum().clamp_min(2.0)`: halves an image with a single counted
#     class; the tests relate Lovasz values to each other, a hand-computed Lovasz value would kill it.
#   data.ade20k scan_split `or` for `and`: differs only for a root holding both an
#     ADEChallengeData2016/ folder and an images/ folder.
#   engine.predict _share_flip's size rule (16 mutants): whether both flip views share one forward
#     pass; tests/test_predict_reference.py checks the result with share_flip None, True and False,
#     so these only change speed and memory, which no unit test measures.
#
# Issue-20 modules (trainer, settings, build, job, status, sweep, report, trust, eval, export, preempt,
#   class_weights, bad_samples, checks): their equivalent survivors are listed one group per line, with the
#   reason, in benchmarks/mutation_equivalents.txt, which the table reads; the figures are in docs/testing.md.
# Import-time code: the option factories (integer, number, choice, optional, auto_or; now segrun/checks.py) run when
#   the tools' settings classes are defined, before mutmut activates a mutant; tests/test_settings.py
#   calls them directly so their mutants are reachable.

