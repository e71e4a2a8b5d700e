"""Here so that pytest puts this directory on sys.path: the tests run from a checkout, installed or not."""
