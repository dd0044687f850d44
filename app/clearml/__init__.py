"""Everything that talks to ClearML, split by job; the only package that imports `clearml`.

session    the task: start (offline fallback), configuration as hyperparameters, properties, scalars, console,
           abort, close; every call guarded, each channel with its own backoff
endpoint   this instance in the server's Model Endpoints table (register, status reports, unregister)
storage    model downloads: a ClearML model ID, or a URL through ClearML's storage manager
instances  launch, clone and read instances (the SDK calls behind `python -m app.instances`)
"""
