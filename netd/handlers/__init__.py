"""What serves a connection in the child: builtin services and python handlers."""
