"""Key maps and drawing for ``sfv-world play`` (pygame-ce).

:class:`KeyMap` turns the set of held keys into an action. It comes from the real env when that env
has one (``get_keys_to_action()``, e.g. ALE), else from a default for Discrete actions: left/right
(arrows or A/D) for two actions, plus up (arrow or W) for three (MiniGrid: left, right, forward),
digit keys for any Discrete(n <= 10), and arrows/WASD pushing the first two dimensions of a Box.
``play.keys`` ({pygame key name: action}) overrides all of it. :func:`draw_hud` draws the side panel.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pygame

ALIASES = {pygame.K_LEFT: pygame.K_a, pygame.K_RIGHT: pygame.K_d, pygame.K_UP: pygame.K_w, pygame.K_DOWN: pygame.K_s}


def _code(key: Any) -> int:
    """A pygame key code from an int code, a one-character string or a pygame key name ('left', 'space')."""
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str):
        if len(key) == 1:
            return ord(key.lower())
        if not pygame.display.get_init():
            pygame.display.init()
        try:
            code = pygame.key.key_code(key)
        except ValueError:
            code = pygame.K_UNKNOWN
        if code == pygame.K_UNKNOWN:
            raise ValueError(f"play.keys: unknown key name {key!r} (pygame key names: 'left', 'space', 'a', ...)")
        return int(code)
    raise ValueError(f"play.keys: a key must be a name or a code, got {key!r}")


def key_label(code: int) -> str:
    """Short display name of a key code ('space', 'Left/a': arrows alias W/A/S/D)."""
    arrows = {pygame.K_LEFT: "Left", pygame.K_RIGHT: "Right", pygame.K_UP: "Up", pygame.K_DOWN: "Down"}
    name = arrows.get(code) or pygame.key.name(code) or str(code)
    alias = [a for a, k in ALIASES.items() if k == code]
    return f"{key_label(alias[0])}/{name}" if alias else name


@dataclass
class KeyMap:
    """Held keys -> action.

    combos: frozenset of key codes -> Discrete action (int); for Box spaces ``box`` holds per-key
    vectors that add up. ``idle``: action when no mapped key is held (None: repeat the last one).
    labels: action -> display name.
    """

    combos: dict[frozenset[int], Any] = field(default_factory=dict)
    idle: Any = None
    labels: dict[int, str] = field(default_factory=dict)
    box: dict[int, np.ndarray] | None = None
    box_low: np.ndarray | None = None
    box_high: np.ndarray | None = None

    @property
    def keys(self) -> set[int]:
        if self.box is not None:
            return set(self.box)
        return set().union(*self.combos) if self.combos else set()

    def action(self, held: set[int]) -> Any:
        """The action of the held key codes (arrows count as W/A/S/D where those are mapped); None if none."""
        keys = self.keys
        held = {ALIASES.get(k, k) if ALIASES.get(k, k) in keys and k not in keys else k for k in held} & keys
        if not held:
            return None
        if self.box is not None:
            v = np.sum([self.box[k] for k in held], axis=0)
            return np.clip(v, self.box_low, self.box_high).astype(np.float32)
        combo = frozenset(held)
        if combo in self.combos:
            return self.combos[combo]
        best = max((c for c in self.combos if c <= combo), key=len, default=None)  # largest mapped subset
        return None if best is None else self.combos[best]

    def legend(self) -> list[str]:
        """Lines 'keys: action name' for the on-screen help."""
        if self.box is not None:
            return [f"{key_label(k)}: {np.round(v, 2).tolist()}" for k, v in self.box.items()]
        by_action: dict[Any, list[str]] = {}
        for combo, a in self.combos.items():
            by_action.setdefault(a, []).append("+".join(key_label(k) for k in sorted(combo)))
        lines = [f"{'/'.join(ks)}: {self.labels.get(int(a), str(a))}" for a, ks in sorted(by_action.items())]
        if self.idle is not None:
            lines.append(f"no key: {self.labels.get(int(self.idle), str(self.idle))}")
        return lines


def _wrapper_attr(env: Any, name: str) -> Any:
    """``name`` of the first wrapper in env's chain that has it (gymnasium 1.x wrappers do not forward)."""
    while env is not None:
        if name in vars(env):
            return vars(env)[name]
        env = getattr(env, "env", None)
    return None


def action_labels(n: int, env: Any = None) -> dict[int, str]:
    """Names of Discrete actions from the env (ALE meanings, MiniGrid's Actions enum), else 'action i'."""
    u = getattr(env, "unwrapped", None)
    names: list[str] | None = None
    if u is not None and hasattr(u, "get_action_meanings"):
        names = [str(m).lower() for m in u.get_action_meanings()]
    elif u is not None and hasattr(u, "actions"):
        try:
            names = [a.name for a in u.actions]
        except (TypeError, AttributeError):
            names = None
    subset = _wrapper_attr(env, "subset")
    if names is not None and subset is not None:
        names = [names[i] for i in subset]
    if names is None or len(names) < n:
        names = {2: ["left", "right"]}.get(n) or [f"action {i}" for i in range(n)]
    return {i: f"{i} {names[i]}" if not names[i].startswith("action") else names[i] for i in range(n)}


def make_keymap(action_space, env: Any = None, override: Mapping[str, Any] | None = None) -> KeyMap:
    """The key map for ``action_space`` (gymnasium Discrete or Box): ``override``, else the env's, else defaults."""
    from gymnasium import spaces

    if isinstance(action_space, spaces.Box):
        dims = int(np.prod(action_space.shape))
        low, high = action_space.low.reshape(-1), action_space.high.reshape(-1)
        box: dict[int, np.ndarray] = {}
        for d, (neg, pos) in enumerate([(pygame.K_a, pygame.K_d), (pygame.K_s, pygame.K_w)][:dims]):
            for code, bound in ((neg, low[d]), (pos, high[d])):
                v = np.zeros(dims, np.float32)
                v[d] = bound if np.isfinite(bound) else (1.0 if code == pos else -1.0)
                box[code] = v
        idle = np.clip(np.zeros(dims, np.float32), low, high)
        return KeyMap(box=box, idle=idle, box_low=low, box_high=high)
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"play: no key map for the action space {action_space} (Discrete or Box)")  # noqa: TRY004
    n, start = int(action_space.n), int(action_space.start)
    labels = {start + i: v for i, v in action_labels(n, env).items()}
    idle = None
    meanings = [s.split(" ", 1)[-1] for s in labels.values()]
    if "noop" in meanings:
        idle = start + meanings.index("noop")
    if override:
        combos = {frozenset([_code(k)]): int(a) for k, a in dict(override).items()}
        bad = [a for a in combos.values() if not start <= a < start + n]
        if bad:
            raise ValueError(f"play.keys: actions {bad} are outside {action_space}")
        return KeyMap(combos, idle, labels)
    u = getattr(env, "unwrapped", None)
    if u is not None and hasattr(u, "get_keys_to_action") and _wrapper_attr(env, "subset") is None:
        try:
            table = u.get_keys_to_action()
        except Exception:  # noqa: BLE001  (some envs raise when they have no map)
            table = None
        if table:
            combos = {frozenset(_code(k) for k in keys): int(a) for keys, a in table.items() if keys}
            if idle is not None:  # the no-op is what "no key" does
                combos = {c: a for c, a in combos.items() if a != idle}
            return KeyMap(combos, idle, labels)
    combos: dict[frozenset[int], int] = {}
    if n in (2, 3):
        combos[frozenset([pygame.K_a])] = start
        combos[frozenset([pygame.K_d])] = start + 1
        if n == 3:
            combos[frozenset([pygame.K_w])] = start + 2
    elif n <= 10:
        for i in range(n):
            combos[frozenset([pygame.K_0 + i])] = start + i
    else:
        raise ValueError(f"play: no default keys for {action_space}; give play.keys={{key: action}}")
    return KeyMap(combos, idle, labels)


# ----------------------------------------------------------------------------------------------
# drawing

WHITE, GREY, DIM, RED, GREEN, YELLOW, BG = (235, 235, 235), (160, 160, 160), (90, 90, 90), (230, 80, 70), (90, 200, 110), (240, 200, 60), (22, 24, 30)


def frame_surface(frame: np.ndarray, scale: int) -> pygame.Surface:
    """uint8 [h, w, C] (C = 1 or 3) -> a pygame Surface upscaled ``scale`` times (nearest)."""
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    surf = pygame.surfarray.make_surface(np.ascontiguousarray(frame.transpose(1, 0, 2)))
    return pygame.transform.scale(surf, (frame.shape[1] * scale, frame.shape[0] * scale))


def draw_text(surface: pygame.Surface, font: pygame.font.Font, text: str, pos: tuple[int, int],
              color=WHITE) -> int:
    """Blit one line of text; returns the y below it."""
    img = font.render(text, True, color)
    surface.blit(img, pos)
    return pos[1] + img.get_height() + 2


def draw_meter(surface: pygame.Surface, rect: pygame.Rect, history: list[float], reference: float | None,
               span: float = 1.0) -> None:
    """Running log-likelihood meter: a sparkline of bits/dim values (newest right), with the
    reference (the log-likelihood of the real context) as a line; points below reference - span/2 are red."""
    pygame.draw.rect(surface, (40, 42, 50), rect)
    pygame.draw.rect(surface, DIM, rect, 1)
    if not history:
        return
    vals = np.asarray(history[-rect.width // 3 :], dtype=float)
    ref = float(np.median(vals)) if reference is None else reference
    lo, hi = ref - span, ref + span
    def y_of(v):
        return rect.bottom - 2 - int((np.clip(v, lo, hi) - lo) / (hi - lo) * (rect.height - 4))
    pygame.draw.line(surface, GREY, (rect.left, y_of(ref)), (rect.right - 1, y_of(ref)), 1)
    pts = [(rect.left + 2 + 3 * i, y_of(v)) for i, v in enumerate(vals)]
    if len(pts) > 1:
        pygame.draw.lines(surface, GREEN, False, pts, 2)
    for (x, y), v in zip(pts, vals):
        if v < ref - span / 2:
            pygame.draw.circle(surface, RED, (x, y), 2)


def draw_hud(surface: pygame.Surface, font: pygame.font.Font, small: pygame.font.Font, x: int, lines: list[tuple[str, Any]],
             meter: tuple[list[float], float | None], legend: list[str]) -> None:
    """The side panel from x: status lines (text, color), the log-likelihood meter, the key legend."""
    y = 10
    for text, color in lines:
        y = draw_text(surface, font, text, (x, y), color)
    rect = pygame.Rect(x, y + 4, surface.get_width() - x - 12, 60)
    draw_meter(surface, rect, *meter)
    y = rect.bottom + 10
    for text in legend:
        y = draw_text(surface, small, text, (x, y), GREY)
