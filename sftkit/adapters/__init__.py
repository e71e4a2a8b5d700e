"""sftkit's built-in adapters: plugins registered through the same hook as third-party ones."""
