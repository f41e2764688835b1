"""Output projections that differ by query row, for the merge weights of joint attention.

SHD's closed-form merge weights (:mod:`~shd_plugins.core.merge`) keep the layer output ``sum_h A_h V_h W_O^h``. In
joint attention (SD3, Flux double-stream blocks, CogVideoX) one attention map covers text and image tokens, but a
query row's output then goes through the projection of its own stream: image rows through ``to_out``, text rows
through ``to_add_out``, and SD3's last block discards the text rows' outputs. :class:`RowProjections` says which rows
go through which projection, so that each row's merge terms use its own Gram blocks.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ['RowProjections', 'as_row_projections', 'drop_prefix_rows']


@dataclass(frozen=True, eq=False)
class RowProjections:
    """Output projections that differ by query row: rows [start, stop) go through `weight` (D_s, M*d), or
    through nothing when `weight` is None (their outputs are discarded, e.g. SD3's last block's text rows),
    so they add nothing to the merge terms.

    Why: in joint attention a query row's value-output circuit ``X_h = V_h W_O^h`` uses the projection of the
    stream the row belongs to (``to_out`` for image rows, ``to_add_out`` for text rows), so the merge weights must
    weigh each row with its own Gram blocks (see the module docstring). Pass one wherever an output-projection
    weight is accepted (:func:`~shd_plugins.core.merge.merge_heads`, ``shd_loss``, ``streamed_shd_loss``); a
    one-segment instance gives exactly the results of its weight tensor. Compared by identity (its weights are
    tensors).

    Attributes:
        segments: ``(start, stop, weight)`` triples in row order; the weights are ``nn.Linear`` weights (D_s, M*d)
            with one M*d for all (D_s may differ) or None.
        tokens: Total query rows covered; the segments must tile [0, tokens) in order, without gaps or overlap.
    """
    segments: tuple[tuple[int, int, torch.Tensor | None], ...]
    tokens: int

    def __repr__(self) -> str:
        pieces = ', '.join(f'[{a}, {b}): {None if w is None else tuple(w.shape)}' for a, b, w in self.segments)
        return f'RowProjections({pieces}; tokens={self.tokens})'

    def __post_init__(self) -> None:
        segments = tuple(tuple(segment) for segment in self.segments)
        object.__setattr__(self, 'segments', segments)
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f'RowProjections.tokens must be an int >= 1, got {self.tokens!r}.')
        position, width = 0, None
        for i, segment in enumerate(segments):
            if len(segment) != 3:
                raise ValueError(f'RowProjections segment {i} must be (start, stop, weight), got {len(segment)} items.')
            start, stop, weight = segment
            if not (isinstance(start, int) and isinstance(stop, int)) or start != position or stop <= start:
                raise ValueError(
                    f'RowProjections segments must tile the rows [0, {self.tokens}) in order without gaps or overlap: '
                    f'segment {i} is [{start}, {stop}) but must start at {position} and end after its start.')
            if weight is not None:
                if not isinstance(weight, torch.Tensor):
                    raise TypeError(f'RowProjections segment {i} weight must be a torch.Tensor (D, M*d) or None, '
                                    f'got {type(weight).__name__}.')
                if weight.dim() != 2 or (width is not None and weight.shape[1] != width):
                    earlier = '' if width is None else f', the earlier ones M*d = {width}'
                    raise ValueError(
                        f'RowProjections weights must all be (D_s, M*d) with one M*d (D_s may differ): segment {i} '
                        f'has shape {tuple(weight.shape)}{earlier}.')
                width = weight.shape[1]
            position = stop
        if position != self.tokens:
            raise ValueError(f'RowProjections segments cover the rows [0, {position}) but tokens is {self.tokens}: '
                             f'they must tile [0, tokens) exactly.')

    @property
    def width(self) -> int | None:
        """The weights' M*d, or None when every row is discarded."""
        return next((weight.shape[1] for _, _, weight in self.segments if weight is not None), None)

    def row_slices(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[slice, torch.Tensor | None]]:
        """``(rows, weight)`` of the segments meeting the rows [start, stop), ``rows`` counted from ``start``: the
        pieces of one row block (a block may span several segments)."""
        stop = self.tokens if stop is None else stop
        for seg_start, seg_stop, weight in self.segments:
            low, high = max(seg_start, start), min(seg_stop, stop)
            if low < high:
                yield slice(low - start, high - start), weight

    def take(self, start: int, stop: int) -> RowProjections:
        """The rows [start, stop), renumbered from 0."""
        if not 0 <= start < stop <= self.tokens:
            raise ValueError(f'Cannot take rows [{start}, {stop}) of RowProjections covering {self.tokens} rows: need '
                             f'0 <= start < stop <= {self.tokens}.')
        return RowProjections(tuple((rows.start, rows.stop, weight) for rows, weight in self.row_slices(start, stop)),
                              stop - start)

    def drop_leading(self, n: int) -> RowProjections:
        """The rows left after dropping ``n`` leading (prefix) rows; row indices shift by -n."""
        if not 0 <= n < self.tokens:
            raise ValueError(f'Cannot drop {n} leading rows of RowProjections covering {self.tokens} rows: at least '
                             f'one row must remain.')
        return self if n == 0 else self.take(n, self.tokens)

    def detach(self) -> RowProjections:
        """The same rows with detached weights (the merge weights carry no gradient)."""
        return RowProjections(tuple((start, stop, None if weight is None else weight.detach())
                                    for start, stop, weight in self.segments), self.tokens)


def as_row_projections(out_weight: torch.Tensor | RowProjections, tokens: int) -> RowProjections:
    """A plain weight as the one-segment case, so that one code path serves both."""
    return out_weight if isinstance(out_weight, RowProjections) else RowProjections(((0, tokens, out_weight),), tokens)


def drop_prefix_rows(out_weight: torch.Tensor | RowProjections | None, prefix: int,
                     tokens: int) -> torch.Tensor | RowProjections | None:
    """The output projection(s) of the teacher's rows kept when ``prefix`` of its ``tokens`` query rows are dropped
    (cls/dist/register tokens): a plain weight serves every row; RowProjections lose their leading rows."""
    if not isinstance(out_weight, RowProjections):
        return out_weight
    if out_weight.tokens != tokens:
        raise ValueError(
            f'The teacher out_weight RowProjections cover {out_weight.tokens} query rows but the teacher maps have '
            f'{tokens} (before dropping {prefix} prefix tokens): the segments must tile all of the teacher rows.')
    return out_weight.drop_leading(prefix)
