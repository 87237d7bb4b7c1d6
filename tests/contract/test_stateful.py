"""Random sequences of store operations, checked after every step against a plain model.

The model is dicts and lists written here with no sessionkeeper code, so a rule the store
gets wrong (seqs, versions, aggregates, merge patch, expiry) cannot leak into what the
test expects. Time comes from a FrozenClock that the machine moves by hand.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from sessionkeeper import (
    UNSET,
    AlreadyExists,
    FrozenClock,
    Message,
    NotFound,
    Session,
    SessionSummary,
    Settings,
    Status,
    SyncSessionStore,
    VersionConflict,
)
from sessionkeeper.models import Unset
from sessionkeeper.sync import open_store_sync

T = TypeVar("T")
VersionChoice = Literal["none", "right", "behind", "ahead"]

# --- the model -------------------------------------------------------------------------


@dataclass
class ModelMessage:
    seq: int
    role: str
    content: Any
    input_tokens: int
    output_tokens: int
    cost: float
    created_at: float


@dataclass
class ModelSession:
    id: str
    owner: str | None
    title: str
    status: str
    step: str | None
    state: dict[str, Any]
    created_at: float
    expires_at: float | None
    idle_ttl: float | None
    deadline: float | None
    updated_at: float = 0.0
    version: int = 1
    last_seq: int = 0
    messages: list[ModelMessage] = field(default_factory=list)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def touch(self, now: float) -> None:
        """An access renews idle expiry, never past the absolute deadline."""
        if self.idle_ttl is not None:
            self.expires_at = min(t for t in (now + self.idle_ttl, self.deadline) if t is not None)

    def changed(self, now: float) -> None:
        self.version += 1
        self.updated_at = now
        self.touch(now)


def merged(target: Any, patch: Any) -> Any:
    """RFC 7396: null removes a member, an object merges, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merged(result.get(key), value)
    return result


def at(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def check_summary(got: SessionSummary, want: ModelSession) -> None:
    assert got.id == want.id
    assert (got.owner, got.title, got.status, got.step) == (
        want.owner,
        want.title,
        want.status,
        want.step,
    )
    assert got.version == want.version
    assert got.created_at == at(want.created_at)
    assert got.updated_at == at(want.updated_at)
    assert got.expires_at == at(want.expires_at)
    assert got.idle_ttl == want.idle_ttl
    assert got.last_seq == want.last_seq
    assert got.message_count == len(want.messages)
    assert got.input_tokens == sum(m.input_tokens for m in want.messages)
    assert got.output_tokens == sum(m.output_tokens for m in want.messages)
    assert got.cost == pytest.approx(sum(m.cost for m in want.messages), abs=1e-9)


def check_messages(got: list[Message], want: list[ModelMessage], session_id: str) -> None:
    assert [m.seq for m in got] == [m.seq for m in want]
    for message, expected in zip(got, want, strict=True):
        assert message.session_id == session_id
        assert (message.role, message.content) == (expected.role, expected.content)
        assert (message.input_tokens, message.output_tokens) == (
            expected.input_tokens,
            expected.output_tokens,
        )
        assert message.cost == expected.cost
        assert message.created_at == at(expected.created_at)


# --- strategies ------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "c", "d"])
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.text(alphabet="xyzé ", max_size=4),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), SCALARS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
STATES = st.dictionaries(KEYS, JSON_VALUES, max_size=4)
# Patches: nulls delete, objects merge (and may carry nulls of their own), the rest replaces.
PATCH_VALUES = st.recursive(
    st.one_of(st.none(), SCALARS, st.lists(JSON_VALUES, max_size=2)),
    lambda inner: st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)
PATCHES = st.dictionaries(KEYS, PATCH_VALUES, max_size=4)

OWNERS = st.sampled_from([None, "alice", "bob"])
TITLES = st.text(alphabet="ab XY", max_size=8)
STATUS_VALUES: st.SearchStrategy[Status] = st.sampled_from(["active", "completed", "archived"])
STEPS = st.sampled_from([None, "draft", "review"])
TTLS = st.one_of(st.none(), st.sampled_from([30, 60, 300.5]))
IDLE_TTLS = st.one_of(st.none(), st.sampled_from([20, 45.5, 120]))
# Mostly writes that should land; a stale version (behind or ahead) now and then.
VERSIONS: st.SearchStrategy[VersionChoice] = st.sampled_from(
    ["none", "right", "none", "right", "behind", "ahead"]
)
CLIENT_IDS = st.one_of(st.none(), st.sampled_from(["s1", "s2", "s3"]))
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "tool"]),
            "content": st.one_of(st.text(max_size=6), st.dictionaries(KEYS, SCALARS, max_size=2)),
            "input_tokens": st.integers(0, 500),
            "output_tokens": st.integers(0, 500),
            "cost": st.floats(0, 0.5, allow_nan=False),
        }
    ),
    min_size=1,
    max_size=3,
)


def maybe(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | Unset]:
    return st.one_of(st.just(UNSET), strategy)


# --- the machine -----------------------------------------------------------------------


class SessionMachine(RuleBasedStateMachine):
    """One fresh store (and, for file engines, a fresh folder) per run."""

    url_factories: ClassVar[list[Callable[[], str]]] = []
    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        url = self.url_factories[0]()
        self.clock = FrozenClock()
        self.store: SyncSessionStore = open_store_sync(
            url, settings=Settings(url=url), clock=self.clock
        )
        self.store.open()
        self.model: dict[str, ModelSession] = {}

    def teardown(self) -> None:
        self.store.close()

    # --- helpers -----------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.clock.now()

    def live(self, session_id: str) -> ModelSession | None:
        found = self.model.get(session_id)
        return None if found is None or found.expired(self.now) else found

    def version_for(self, session_id: str, choice: VersionChoice) -> int | None:
        found = self.live(session_id)
        current = 1 if found is None else found.version
        if choice == "none":
            return None
        if choice == "right":
            return current
        if choice == "behind" and current > 1:
            return current - 1
        return current + 1

    def write(
        self, session_id: str, version: int | None, call: Callable[[], T]
    ) -> tuple[ModelSession, T] | None:
        """Run a write; if the model says it must fail, check it fails and return None."""
        found = self.live(session_id)
        if found is None:
            with pytest.raises(NotFound):
                call()
            return None
        if version is not None and version != found.version:
            with pytest.raises(VersionConflict):
                call()
            self.check_unchanged(found)
            return None
        return found, call()

    def check_unchanged(self, want: ModelSession) -> None:
        """After a failed write: a read shows the session exactly as it was."""
        got = self.store.get_session(want.id)
        want.touch(self.now)
        check_summary(got, want)
        assert got.state == want.state
        check_messages(self.store.read_messages(want.id, limit=1000), want.messages, want.id)

    # --- sessions ----------------------------------------------------------------------

    @rule(
        target=sessions,
        client_id=CLIENT_IDS,
        owner=OWNERS,
        title=TITLES,
        status=STATUS_VALUES,
        step=STEPS,
        state=STATES,
        ttl=TTLS,
        idle_ttl=IDLE_TTLS,
    )
    def create_session(
        self,
        client_id: str | None,
        owner: str | None,
        title: str,
        status: Status,
        step: str | None,
        state: dict[str, Any],
        ttl: float | None,
        idle_ttl: float | None,
    ) -> str:
        def create() -> Session:
            return self.store.create_session(
                session_id=client_id,
                owner=owner,
                title=title,
                status=status,
                step=step,
                state=state,
                ttl=ttl,
                idle_ttl=idle_ttl,
            )

        if client_id is not None and self.live(client_id) is not None:
            with pytest.raises(AlreadyExists):
                create()
            return client_id
        got = create()
        now = self.now
        deadline = None if ttl is None else now + ttl
        idle_end = None if idle_ttl is None else now + idle_ttl
        ends = [t for t in (deadline, idle_end) if t is not None]
        want = ModelSession(
            id=got.id,
            owner=owner,
            title=title,
            status=status,
            step=step,
            state=copy.deepcopy(state),
            created_at=now,
            updated_at=now,
            expires_at=min(ends) if ends else None,
            idle_ttl=None if idle_ttl is None else float(idle_ttl),
            deadline=deadline,
        )
        assert got.id == client_id if client_id is not None else got.id not in self.model
        self.model[got.id] = want  # replaces an expired session with the same id
        check_summary(got, want)
        assert got.state == want.state
        return got.id

    @rule(session_id=sessions)
    def get_session(self, session_id: str) -> None:
        want = self.live(session_id)
        if want is None:
            with pytest.raises(NotFound):
                self.store.get_session(session_id)
            return
        got = self.store.get_session(session_id)
        want.touch(self.now)
        check_summary(got, want)
        assert got.state == want.state

    @rule(target=sessions, session_id=consumes(sessions), choice=VERSIONS)
    def delete_session(self, session_id: str, choice: VersionChoice) -> MultipleResults[str]:
        """A deleted id leaves the bundle (so later steps mostly hit live sessions), but
        first every read and write of it must say NotFound."""
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.delete_session(session_id, expected_version=version),
        )
        if done is None:
            return multiple(session_id)
        del self.model[session_id]
        for gone in (
            lambda: self.store.get_session(session_id),
            lambda: self.store.read_messages(session_id),
            lambda: self.store.update_state(session_id, {"a": 1}),
            lambda: self.store.append_messages(session_id, [{"role": "user"}]),
            lambda: self.store.pop_message(session_id),
            lambda: self.store.delete_session(session_id),
        ):
            with pytest.raises(NotFound):
                gone()
        return multiple()

    @rule(
        session_id=sessions,
        title=maybe(TITLES),
        status=maybe(STATUS_VALUES),
        step=maybe(STEPS),
        owner=maybe(OWNERS),
        choice=VERSIONS,
    )
    def update_session(
        self,
        session_id: str,
        title: str | Unset,
        status: Status | Unset,
        step: str | Unset | None,
        owner: str | Unset | None,
        choice: VersionChoice,
    ) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.update_session(
                session_id,
                title=title,
                status=status,
                step=step,
                owner=owner,
                expected_version=version,
            ),
        )
        if done is None:
            return
        want, got = done
        if not isinstance(title, Unset):
            want.title = title
        if not isinstance(status, Unset):
            want.status = status
        if not isinstance(step, Unset):
            want.step = step
        if not isinstance(owner, Unset):
            want.owner = owner
        want.changed(self.now)
        check_summary(got, want)
        assert got.state == want.state

    @rule(session_id=sessions, patch=PATCHES, choice=VERSIONS)
    def patch_state(self, session_id: str, patch: dict[str, Any], choice: VersionChoice) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.update_state(session_id, patch, expected_version=version),
        )
        if done is None:
            return
        want, got = done
        want.state = merged(want.state, patch)
        want.changed(self.now)
        check_summary(got, want)
        assert got.state == want.state

    @rule(session_id=sessions, state=STATES, choice=VERSIONS)
    def replace_state(self, session_id: str, state: dict[str, Any], choice: VersionChoice) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.update_state(
                session_id, state, replace=True, expected_version=version
            ),
        )
        if done is None:
            return
        want, got = done
        want.state = copy.deepcopy(state)
        want.changed(self.now)
        check_summary(got, want)
        assert got.state == want.state

    # --- messages ----------------------------------------------------------------------

    @rule(session_id=sessions, messages=MESSAGES, choice=VERSIONS)
    def append_messages(
        self, session_id: str, messages: list[dict[str, Any]], choice: VersionChoice
    ) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.append_messages(session_id, messages, expected_version=version),
        )
        if done is None:
            return
        want, got = done
        added = []
        for message in messages:
            want.last_seq += 1
            added.append(
                ModelMessage(seq=want.last_seq, created_at=self.now, **copy.deepcopy(message))
            )
        want.messages.extend(added)
        want.changed(self.now)
        check_messages(got, added, session_id)

    @rule(session_id=sessions, after_seq=st.integers(0, 14), limit=st.integers(1, 5))
    def read_messages(self, session_id: str, after_seq: int, limit: int) -> None:
        want = self.live(session_id)
        if want is None:
            with pytest.raises(NotFound):
                self.store.read_messages(session_id, after_seq=after_seq, limit=limit)
            return
        got = self.store.read_messages(session_id, after_seq=after_seq, limit=limit)
        want.touch(self.now)
        check_messages(got, [m for m in want.messages if m.seq > after_seq][:limit], session_id)

    @rule(session_id=sessions, n=st.integers(1, 5))
    def last_messages(self, session_id: str, n: int) -> None:
        want = self.live(session_id)
        if want is None:
            with pytest.raises(NotFound):
                self.store.last_messages(session_id, n)
            return
        got = self.store.last_messages(session_id, n)
        want.touch(self.now)
        check_messages(got, want.messages[-n:], session_id)

    @rule(session_id=sessions, choice=VERSIONS)
    def pop_message(self, session_id: str, choice: VersionChoice) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.pop_message(session_id, expected_version=version),
        )
        if done is None:
            return
        want, got = done
        if not want.messages:
            assert got is None  # and nothing changed: not even the idle expiry
            return
        expected = want.messages.pop()
        want.changed(self.now)
        assert got is not None
        check_messages([got], [expected], session_id)

    @rule(session_id=sessions, choice=VERSIONS)
    def clear_messages(self, session_id: str, choice: VersionChoice) -> None:
        version = self.version_for(session_id, choice)
        done = self.write(
            session_id,
            version,
            lambda: self.store.clear_messages(session_id, expected_version=version),
        )
        if done is None:
            return
        want, removed = done
        assert removed == len(want.messages)
        want.messages.clear()
        want.changed(self.now)

    # --- listings, time and expiry -----------------------------------------------------

    @rule(
        owner=maybe(OWNERS),
        status=st.one_of(st.none(), STATUS_VALUES),
        order_by=st.sampled_from(["created_at", "updated_at"]),
        descending=st.booleans(),
        page_size=st.integers(1, 4),
    )
    def list_sessions(
        self,
        owner: str | Unset | None,
        status: Status | None,
        order_by: Literal["created_at", "updated_at"],
        descending: bool,
        page_size: int,
    ) -> None:
        chosen = [
            s
            for s in self.model.values()
            if not s.expired(self.now)
            and (isinstance(owner, Unset) or s.owner == owner)
            and (status is None or s.status == status)
        ]
        chosen.sort(
            key=lambda s: (s.created_at if order_by == "created_at" else s.updated_at, s.id),
            reverse=descending,
        )
        assert self.store.count_sessions(owner=owner, status=status) == len(chosen)
        listed: list[SessionSummary] = []
        cursor = None
        for _ in range(len(chosen) + 2):
            page = self.store.list_sessions(
                owner=owner,
                status=status,
                order_by=order_by,
                descending=descending,
                limit=page_size,
                cursor=cursor,
            )
            assert len(page.items) <= page_size
            listed.extend(page.items)
            cursor = page.next_cursor
            if cursor is None:
                break
        assert [s.id for s in listed] == [s.id for s in chosen]
        for got, want in zip(listed, chosen, strict=True):
            check_summary(got, want)

    @rule(seconds=st.sampled_from([1, 5, 19.5, 20, 30, 45.5, 60, 120, 400]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def purge_expired(self) -> None:
        expired = [s.id for s in self.model.values() if s.expired(self.now)]
        assert self.store.purge_expired() == len(expired)
        for session_id in expired:
            del self.model[session_id]

    @invariant()
    def store_matches_model(self) -> None:
        """Listing and counting never renew expiry, so they can check after every step."""
        live = sorted(
            (s for s in self.model.values() if not s.expired(self.now)),
            key=lambda s: (s.created_at, s.id),
            reverse=True,
        )
        assert self.store.count_sessions() == len(live)
        listed = self.store.list_sessions(limit=1000).items
        assert [s.id for s in listed] == [s.id for s in live]
        for got, want in zip(listed, live, strict=True):
            check_summary(got, want)
        for gone in self.model.values():
            if gone.expired(self.now):  # expired, not yet purged: absent to every read
                with pytest.raises(NotFound):
                    self.store.get_session(gone.id)
                with pytest.raises(NotFound):
                    self.store.last_messages(gone.id)


def test_store_agrees_with_model(url_factory: Callable[[], str]) -> None:
    """Each run gets its own store, in a fresh namespace of the engine."""

    class Machine(SessionMachine):
        url_factories: ClassVar[list[Callable[[], str]]] = [url_factory]

    run_state_machine_as_test(
        Machine,
        settings=hypothesis.settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
