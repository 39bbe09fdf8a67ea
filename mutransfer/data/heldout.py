"""Is the held-out split big enough for one evaluation? A val split smaller than what an evaluation
is configured to draw does not fail: ``TokenDataset.eval_batches`` quietly evaluates on less, and
every held-out loss gets noisier than its settings say. ``data prepare`` and every run start say so,
with both numbers."""

from __future__ import annotations


def eval_draw(val_tokens: int, batches: int, batch_size: int, seq_len: int) -> tuple[int, int]:
    """(tokens one evaluation is configured to predict, tokens it predicts from a split of ``val_tokens``).

    Mirrors ``TokenDataset.eval_batches``: windows of ``seq_len`` + 1 tokens at stride ``seq_len``,
    full batches only unless the split holds less than one batch.
    """
    wanted = batches * batch_size * seq_len
    windows = max(0, (val_tokens - 1) // seq_len)
    full = min(batches, max(1, windows // batch_size))
    return wanted, min(windows, full * batch_size) * seq_len


def short_heldout_warning(val_tokens: int, batches: int, batch_size: int, seq_len: int, what: str,
                          fix: str) -> str | None:
    """A one-line warning when ``val_tokens`` hold less than one evaluation of ``batches`` x
    ``batch_size`` x ``seq_len`` tokens (None when they hold it). ``what`` names the settings,
    ``fix`` says what to change."""
    wanted, used = eval_draw(val_tokens, batches, batch_size, seq_len)
    if used >= wanted:
        return None
    return (f"warning: the held-out (val) split has {val_tokens:,} tokens, less than one evaluation of {what} "
            f"draws ({batches} batches x {batch_size} sequences x {seq_len} tokens = {wanted:,}); each evaluation "
            f"uses {used:,} held-out tokens, so its loss is noisier than configured; {fix}")


def suggested_val_fraction(total_tokens: int, wanted: int) -> float:
    """A ``val_fraction`` that holds ``wanted`` tokens of ``total_tokens`` with a margin of 25 % (the
    split is drawn by document, so the held-out share scatters around the fraction); at most 0.5."""
    return min(0.5, 1.25 * (wanted + 1) / max(total_tokens, 1))
