import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from eqx_models.chmm import CHMM, clone_graph, place_fields, random_room, room_walk


MOVES = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}


def test_random_room_is_deterministic(getkey):
    key = getkey()
    room = random_room(6, 8, 4, key=key)
    assert room.shape == (6, 8) and room.dtype == jnp.int32
    assert int(room.min()) >= 0 and int(room.max()) < 4
    np.testing.assert_array_equal(room, random_room(6, 8, 4, key=key))
    with pytest.raises(ValueError, match="`height` must be a positive integer"):
        random_room(0, 8, 4, key=key)


def test_walk_follows_the_rules(getkey):
    room = np.array(random_room(4, 5, 3, key=getkey()))
    room[1, 2] = -1  # an obstacle
    key = getkey()
    x, a, pos = room_walk(jnp.asarray(room), 500, key=key)
    x, a, pos = np.asarray(x), np.asarray(a), np.asarray(pos)
    assert set(np.unique(a)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(x, room[pos[:, 0], pos[:, 1]])
    stays = 0
    for t in range(499):
        dr, dc = MOVES[a[t]]
        r, c = pos[t, 0] + dr, pos[t, 1] + dc
        blocked = not (0 <= r < 4 and 0 <= c < 5) or room[r, c] == -1
        expected = pos[t] if blocked else (r, c)
        np.testing.assert_array_equal(pos[t + 1], expected)
        stays += blocked
    assert stays > 0
    assert not np.any((pos[:, 0] == 1) & (pos[:, 1] == 2))
    again = room_walk(jnp.asarray(room), 500, key=key)
    np.testing.assert_array_equal(again[2], pos)
    _, _, fixed = room_walk(jnp.asarray(room), 3, key=key, start=(3, 4))
    np.testing.assert_array_equal(fixed[0], [3, 4])


def test_walk_errors(getkey):
    room = jnp.array([[0, -1], [1, 1]])
    with pytest.raises(
        ValueError, match=r"`start` must be an enterable cell.*\(0, 1\)"
    ):
        room_walk(room, 5, key=getkey(), start=(0, 1))
    with pytest.raises(ValueError, match=r"`start` must be an enterable cell"):
        room_walk(room, 5, key=getkey(), start=(2, 0))
    with pytest.raises(eqx.EquinoxRuntimeError, match="enterable cell"):
        jax.block_until_ready(
            eqx.filter_jit(lambda s: room_walk(room, 5, key=jr.key(0), start=s))(
                jnp.array([0, 1])
            )
        )
    with pytest.raises(ValueError, match="`length` must be a positive integer"):
        room_walk(room, 0, key=getkey())


def test_place_fields_count_visits():
    states = jnp.array([0, 1, 1, 2, 0])
    positions = jnp.array([[0, 0], [0, 1], [0, 1], [1, 1], [1, 0]])
    fields = place_fields(states, positions, n_states=4, shape=(2, 2))
    expected = np.zeros((4, 2, 2))
    for s, (r, c) in zip(np.asarray(states), np.asarray(positions)):
        expected[s, r, c] += 1
    np.testing.assert_array_equal(fields, expected)
    jitted = eqx.filter_jit(place_fields)(states, positions, n_states=4, shape=(2, 2))
    np.testing.assert_array_equal(jitted, expected)
    with pytest.raises(ValueError, match="same length"):
        place_fields(states[:3], positions, n_states=4, shape=(2, 2))


def test_clone_graph_restricts_to_active_clones():
    T = np.zeros((2, 3, 3))
    T[0] = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    T[1] = [[0.5, 0, 0.5], [1, 0, 0], [0, 0, 1]]
    model = CHMM((2, 1), jnp.asarray(T))
    adjacency, active = clone_graph(model, jnp.array([0, 1, 0, 1]))
    np.testing.assert_array_equal(active, [True, True, False])
    mean = T.mean(0)[:2, :2]
    np.testing.assert_allclose(adjacency[:2, :2], mean / mean.sum(-1, keepdims=True))
    np.testing.assert_array_equal(adjacency[2], 0)
    np.testing.assert_array_equal(adjacency[:, 2], 0)
    jitted, _ = eqx.filter_jit(clone_graph)(model, jnp.array([0, 1, 0, 1]))
    np.testing.assert_allclose(jitted, adjacency)
    pruned, _ = clone_graph(model, jnp.array([0, 1, 2]), threshold=0.3)
    assert np.all((pruned == 0) | (pruned > 0.3))


def test_walk_vmaps_over_keys(getkey):
    room = random_room(3, 3, 2, key=getkey())
    xs, _, _ = jax.vmap(lambda k: room_walk(room, 20, key=k))(jr.split(getkey(), 4))
    assert xs.shape == (4, 20)
