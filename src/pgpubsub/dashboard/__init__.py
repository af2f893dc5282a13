"""The live web dashboard (``pgpubsub dashboard``, extra ``pgpubsub-engine[dashboard]``).

:func:`create_app` returns an ASGI application: ``pgpubsub dashboard`` serves
it with uvicorn, and any ASGI application can mount it::

    from starlette.routing import Mount
    from pgpubsub.dashboard import create_app

    routes = [Mount("/pgpubsub", create_app(dsn, token=os.environ["DASHBOARD_TOKEN"]))]

It reads the database with its own small pool and one LISTEN connection, and
never needs more than the ``pgpubsub grant ROLE --monitor`` privileges unless
actions are enabled.
"""

from ._app import create_app

__all__ = ["create_app"]
