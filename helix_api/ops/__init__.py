"""Operations: metrics, the admin views, health, and schema versions."""
