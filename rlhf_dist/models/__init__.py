"""The model side: loading, forward passes, chat templates."""
