"""Contract: folders are named per owner, renamed, listed with counts and deleted."""

from __future__ import annotations

import pytest

from sessionkeeper import AlreadyExists, InvalidInput, NotFound, SessionStore


async def test_names_are_unique_per_owner(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    assert (work.name, work.owner, work.session_count) == ("Work", "ann", 0)
    await store.create_folder("Work", owner="bob")
    with pytest.raises(AlreadyExists, match="Work"):
        await store.create_folder("Work", owner="ann")
    assert [f.name for f in await store.list_folders(owner="ann")] == ["Work"]


async def test_rename_and_a_taken_name(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    await store.create_folder("Home", owner="ann")
    renamed = await store.rename_folder(work.id, "Office")
    assert renamed.name == "Office"
    assert (await store.get_folder(work.id)).name == "Office"
    with pytest.raises(AlreadyExists, match="Home"):
        await store.rename_folder(work.id, "Home")
    assert (await store.get_folder(work.id)).name == "Office"
    assert (await store.rename_folder(work.id, "Office")).name == "Office"
    with pytest.raises(NotFound):
        await store.rename_folder("missing", "x")


async def test_sessions_go_into_folders_of_their_owner_only(store: SessionStore) -> None:
    folder = await store.create_folder("Work", owner="ann")
    placed = await store.create_session(owner="ann", folder=folder.id)
    assert placed.folder == folder.id
    with pytest.raises(NotFound, match="folder"):
        await store.create_session(owner="bob", folder=folder.id)
    other = await store.create_session(owner="bob")
    with pytest.raises(NotFound, match="folder"):
        await store.update_session(other.id, folder=folder.id)
    with pytest.raises(NotFound, match="folder"):
        await store.update_session(placed.id, owner="bob")
    moved = await store.update_session(placed.id, owner="bob", folder=None)
    assert (moved.owner, moved.folder) == ("bob", None)


async def test_list_with_counts_and_filter_sessions_by_folder(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    home = await store.create_folder("Home", owner="ann")
    for _ in range(3):
        await store.create_session(owner="ann", folder=work.id)
    await store.create_session(owner="ann", folder=home.id)
    await store.create_session(owner="ann")
    folders = await store.list_folders(owner="ann")
    assert [(f.name, f.session_count) for f in folders] == [("Home", 1), ("Work", 3)]
    assert len((await store.list_sessions(folder=work.id)).items) == 3
    assert await store.count_sessions(folder=None, owner="ann") == 1
    assert len(await store.list_folders()) == 2


async def test_delete_reassigns_sessions(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    archive = await store.create_folder("Archive", owner="ann")
    session = await store.create_session(owner="ann", folder=work.id)
    assert await store.delete_folder(work.id, reassign_to=archive.id) == 1
    moved = await store.get_session(session.id)
    assert moved.folder == archive.id
    assert moved.version == session.version + 1
    with pytest.raises(NotFound):
        await store.get_folder(work.id)
    assert (await store.get_folder(archive.id)).session_count == 1


async def test_delete_to_a_folder_of_another_owner_changes_nothing(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    theirs = await store.create_folder("Theirs", owner="bob")
    session = await store.create_session(owner="ann", folder=work.id)
    with pytest.raises(NotFound, match="folder"):
        await store.delete_folder(work.id, reassign_to=theirs.id)
    assert (await store.get_session(session.id)).folder == work.id
    assert (await store.get_folder(work.id)).session_count == 1


async def test_delete_cascade_removes_sessions_and_messages(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    doomed = await store.create_session(owner="ann", folder=work.id)
    await store.append_message(doomed.id, "user", "bye")
    kept = await store.create_session(owner="ann")
    assert await store.delete_folder(work.id, cascade=True) == 1
    with pytest.raises(NotFound):
        await store.get_session(doomed.id)
    await store.get_session(kept.id)


async def test_delete_plain_leaves_sessions_unfiled(store: SessionStore) -> None:
    work = await store.create_folder("Work", owner="ann")
    session = await store.create_session(owner="ann", folder=work.id)
    assert await store.delete_folder(work.id) == 1
    assert (await store.get_session(session.id)).folder is None
    with pytest.raises(NotFound):
        await store.delete_folder(work.id)


async def test_bad_folder_input(store: SessionStore) -> None:
    with pytest.raises(InvalidInput, match="name"):
        await store.create_folder("   ", owner="ann")
    work = await store.create_folder("Work", owner="ann")
    with pytest.raises(InvalidInput, match="cascade"):
        await store.delete_folder(work.id, reassign_to=work.id, cascade=True)
    with pytest.raises(InvalidInput, match="reassign_to"):
        await store.delete_folder(work.id, reassign_to=work.id)
    with pytest.raises(InvalidInput, match="folder_id"):
        await store.get_folder("../etc")
    assert (await store.get_folder(work.id)).name == "Work"
