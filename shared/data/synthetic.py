"""Seeded synthetic interactions with long-tailed popularity and latent user tastes.

Used for scale tests beyond MovieLens (10^5+ devices). See :func:`generate_synthetic`
for the generative model.
"""

from __future__ import annotations

import math

import numpy as np

from shared.data.types import InteractionLog

__all__ = ["MIN_INTERACTIONS", "generate_synthetic"]

MIN_INTERACTIONS = 5  # every synthetic user has at least this many interactions
# Score-matrix elements per chunk of users (float32: 16 MiB per buffer). Fixed, so
# the random stream, and hence the output, does not depend on the machine.
_CHUNK_ELEMENTS = 1 << 22
_START_TIME = 1_000_000_000.0  # Sep 2001, in seconds, like MovieLens timestamps
_START_SPREAD = 3 * 365 * 86_400.0  # users start within three years
_MEAN_GAP = 86_400.0  # one day between a user's interactions on average


def generate_synthetic(
    num_users: int,
    num_items: int,
    mean_interactions: float,
    seed: int,
    *,
    zipf_exponent: float = 1.0,
    latent_dim: int = 16,
    taste_strength: float = 2.0,
) -> InteractionLog:
    r"""Generate a seeded interaction log with Zipf-like popularity and user tastes.

    Generative model (all draws from ``numpy.random.default_rng(seed)``, in this order):

    1. Popularity: a random permutation gives each item a popularity rank
       :math:`r_j \in \{0..I-1\}`; its log-popularity is
       :math:`\log p_j = -s \log(r_j + 1)` (Zipf with exponent ``s``), so a few items
       are very popular and most form a long tail. The permutation keeps popularity
       unrelated to item ids.
    2. Tastes: user factors :math:`u_i \sim N(0, I_d)` and item factors
       :math:`v_j \sim N(0, I_d)`, ``d = latent_dim``.
    3. Activity: user *i* has :math:`n_i = 4 + G_i` interactions with
       :math:`G_i \sim \mathrm{Geometric}(1/(m - 4))` on ``{1, 2, ...}``, so
       :math:`n_i \geq 5` and :math:`E[n_i] = m` (``m = mean_interactions``); it is
       capped at ``num_items`` since items are not repeated.
    4. Items: user *i* draws :math:`n_i` distinct items in sequence, each next item
       with probability proportional to
       :math:`\exp(\log p_j + t \langle u_i, v_j\rangle / \sqrt{d})` among those not
       yet drawn (``t = taste_strength``; the scaled inner product is standard normal,
       so ``t`` is the spread of taste in log-odds). This is done exactly with the
       Gumbel-top-k trick: the :math:`n_i` largest of logit + Gumbel noise, in
       descending order, are such a sequence.
    5. Time: the drawn order is the time order. User *i* starts at a uniform time in
       three years from 2001-09-09 and each next interaction follows after
       ``1 + floor(Exponential(1 day))`` seconds, so timestamps increase strictly.

    Cost is O(num_users * num_items) (step 4 scores every item for every user), done
    in chunks of users with bounded memory (about 50 MiB); 10^5 users x 10^4 items
    take seconds.

    Parameters
    ----------
    num_users
        Number of users (devices), at least 1.
    num_items
        Catalogue size, at least 5.
    mean_interactions
        Mean interactions per user ``m``, between 5 and ``num_items``.
    seed
        Seed; the same arguments always give identical output.
    zipf_exponent
        Popularity exponent ``s >= 0`` (0: uniform popularity).
    latent_dim
        Dimension ``d >= 1`` of the taste factors.
    taste_strength
        Weight ``t >= 0`` of tastes against popularity (0: popularity only).

    Returns
    -------
    InteractionLog
        Rows grouped by user (ids ascending), time-ordered within a user; no
        titles; ``source`` states the model and every parameter.

    Raises
    ------
    ValueError
        For parameters outside the ranges above.
    """
    if num_users < 1:
        raise ValueError(f"num_users must be at least 1, got {num_users}")
    if num_items < MIN_INTERACTIONS:
        raise ValueError(f"num_items must be at least {MIN_INTERACTIONS}, got {num_items}")
    if not MIN_INTERACTIONS <= mean_interactions <= num_items:
        raise ValueError(
            f"mean_interactions must lie between {MIN_INTERACTIONS} and num_items "
            f"({num_items}), got {mean_interactions}"
        )
    if zipf_exponent < 0 or taste_strength < 0 or latent_dim < 1:
        raise ValueError(
            "need zipf_exponent >= 0, taste_strength >= 0 and latent_dim >= 1, got "
            f"{zipf_exponent}, {taste_strength}, {latent_dim}"
        )
    rng = np.random.default_rng(seed)

    popularity_rank = rng.permutation(num_items)
    log_pop = (-zipf_exponent * np.log1p(popularity_rank)).astype(np.float32)
    user_factors = rng.standard_normal((num_users, latent_dim), dtype=np.float32)
    item_factors = rng.standard_normal((num_items, latent_dim), dtype=np.float32)
    # Scale folded into the item side once instead of into every score matrix.
    item_side = np.ascontiguousarray((item_factors * np.float32(taste_strength / math.sqrt(latent_dim))).T)
    counts = MIN_INTERACTIONS - 1 + rng.geometric(1.0 / (mean_interactions - 4.0), num_users)
    counts = np.minimum(counts, num_items).astype(np.int64)

    chunk = max(1, _CHUNK_ELEMENTS // num_items)
    item_parts = []
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        item_parts.append(_draw_chunk(rng, user_factors[start:stop] @ item_side, log_pop, counts[start:stop]))
    item_ids = np.concatenate(item_parts)

    total = int(counts.sum())
    user_ids = np.repeat(np.arange(num_users, dtype=np.int64), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    gaps = 1.0 + np.floor(rng.exponential(_MEAN_GAP, total))
    elapsed = np.cumsum(gaps)
    # Per-user running time: subtract the running total before each user's first row.
    elapsed -= np.repeat(elapsed[starts] - gaps[starts], counts)
    first = _START_TIME + np.floor(rng.uniform(0.0, _START_SPREAD, num_users))
    timestamps = np.repeat(first, counts) + elapsed

    source = (
        f"synthetic(users={num_users}, items={num_items}, mean_interactions={mean_interactions}, "
        f"seed={seed}, zipf_exponent={zipf_exponent}, latent_dim={latent_dim}, "
        f"taste_strength={taste_strength}; model: Zipf popularity x Gaussian tastes, "
        f"count = 4 + geometric, Gumbel-top-k without replacement): {total} interactions"
    )
    return InteractionLog(
        user_ids=user_ids,
        item_ids=item_ids,
        timestamps=timestamps,
        num_users=num_users,
        num_items=num_items,
        item_titles=None,
        source=source,
    )


def _draw_chunk(rng: np.random.Generator, taste: np.ndarray, log_pop: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Gumbel-top-k for a chunk of users: their items, user by user, in draw order.

    ``taste`` (users, items) float32 is overwritten with the perturbed logits.
    """
    num_items = taste.shape[1]
    keys = taste
    keys += log_pop
    # Gumbel noise -log(-log U); U == 0 (rare in float32) gives -inf, never drawn.
    noise = rng.random(keys.shape, dtype=np.float32)
    with np.errstate(divide="ignore"):
        np.log(noise, out=noise)
        np.negative(noise, out=noise)
        np.log(noise, out=noise)
    keys -= noise
    kmax = int(counts.max())
    if kmax < num_items:
        # np.partition finds each row's kmax-th largest key far faster than
        # argpartition; every row has at least kmax keys >= it.
        threshold = np.partition(keys, num_items - kmax, axis=1)[:, num_items - kmax]
        rows, cols = np.nonzero(keys >= threshold[:, None])
    else:
        rows, cols = np.nonzero(np.ones(keys.shape, dtype=bool))
    order = np.lexsort((cols, -keys[rows, cols], rows))  # per user, best key first
    rows, cols = rows[order], cols[order]
    row_start = np.searchsorted(rows, np.arange(len(counts)))
    position = np.arange(len(rows)) - row_start[rows]
    return cols[position < counts[rows]].astype(np.int64)
