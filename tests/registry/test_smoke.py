from registry.services.adapters import register_folder


def test_register_and_read_back(session, store, make_adapter):
    result = register_folder(session, store, make_adapter("code", seed=1), "code", tags=["code"])
    assert result.created
    assert result.version.number == 1
    assert result.version.rank == 8
    assert store.path(result.version.artifact_key).is_file()
