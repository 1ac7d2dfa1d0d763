"""Migration scripts, applied in revision order by ``service.db.engine.upgrade``."""
