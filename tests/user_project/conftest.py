"""A project of our users: its listeners are tested with pgpubsub's own plugin."""

pytest_plugins = ["pgpubsub.testing"]
