"""Shape facts every frontend shares: which dimension of an activation holds the features."""

from __future__ import annotations


def feature_width(
    shape: tuple[int | None, ...] | None, hint: int | None, rank3: str = "ambiguous"
) -> int | None:
    """Feature width from a shape: channels (dim 1) for NC..., last dim for [N, D] / [N, T, D].

    A rank-3 tensor may be [N, C, L] or [N, T, D]; the producer's width (``hint``) decides
    when it matches either.
    """
    if not shape:
        return hint
    rank = len(shape)
    if rank == 1:
        candidate = shape[0] if hint is None else hint
    elif rank == 2:
        candidate = shape[1]
    elif rank == 3:
        if rank3 == "ambiguous" and hint is not None and hint in (shape[1], shape[2]):
            return hint
        candidate = shape[2]
    else:
        candidate = shape[1]
    return candidate if candidate is not None else hint
