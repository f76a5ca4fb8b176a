"""Operations: import, export, save, sync, diff, dedupe, gc -- each plans, then applies."""
