"""Built-in recipes: named pipelines as YAML data."""
