import pytest

import qpass
from qpass.registry import available_passes, available_recipes, load_recipe, parse_pass_spec, parse_pipeline


def test_every_pass_has_a_docstring_summary_and_kind():
    import inspect

    for name, cls in available_passes().items():
        doc = inspect.getmodule(cls).__doc__
        assert doc and doc.strip().splitlines()[0].endswith("."), name
        assert name == name.lower() and " " not in name
        assert isinstance(cls.preserves_float, bool)


def test_pass_spec_parsing():
    assert parse_pass_spec("fold-constants") == ("fold-constants", {})
    assert parse_pass_spec("x(alpha=0.5, mode=per_group, axes=[1, 2], on=true)") == (
        "x", {"alpha": 0.5, "mode": "per_group", "axes": [1, 2], "on": True}
    )
    passes = parse_pipeline("fold-constants(input_size_limit=10),fuse-gelu")
    assert [p.name for p in passes] == ["fold-constants", "fuse-gelu"]
    assert passes[0].input_size_limit == 10


def test_bad_specs_are_user_errors():
    with pytest.raises(qpass.UnknownNameError, match="unknown pass"):
        parse_pipeline("nope")
    with pytest.raises(qpass.UnknownNameError, match="write option=value"):
        parse_pipeline("fold-constants(10)")
    with pytest.raises(qpass.UnknownNameError, match="unknown recipe"):
        load_recipe("nope")


def test_recipes_build_and_yaml_files(tmp_path):
    assert "fold" in available_recipes()
    assert [p.name for p in load_recipe("fold").build()][0] == "fold-constants"
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndescription: two passes\npasses:\n  - fuse-gelu\n  - fold-constants: {input_size_limit: 5}\n")
    recipe = load_recipe(str(path))
    built = recipe.build()
    assert [p.name for p in built] == ["fuse-gelu", "fold-constants"] and built[1].input_size_limit == 5
