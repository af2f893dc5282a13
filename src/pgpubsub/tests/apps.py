from django.apps import AppConfig


class TestsConfig(AppConfig):
    name = "pgpubsub.tests"
    label = "tests"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        import pgpubsub.tests.listeners  # noqa: F401
