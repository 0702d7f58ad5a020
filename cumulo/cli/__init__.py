"""The `cumulo` command: thin verbs over the layers below."""
