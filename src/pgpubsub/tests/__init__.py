"""The example app of the django-pgpubsub documents, importable as ``pgpubsub.tests``.

Add ``pgpubsub.tests`` to ``INSTALLED_APPS`` (beside ``pgpubsub`` and
``pgtrigger``) to run the documented examples as written: ``Author`` and
``Post`` models, the ``PostReads`` and ``AuthorTriggerChannel`` channels and
their listeners. pgpubsub's own test suite runs them in a Django project.
"""
