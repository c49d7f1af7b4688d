from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="zeo-threaded",
    version="0.1.0",
    description="A thread-per-connection ZEO server and client for ZODB",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="ZPL-2.1",
    packages=find_packages(include=["zeo", "zeo.*"]),
    package_data={"zeo": ["*.xml"]},
    python_requires=">=3.9",
    install_requires=[
        "ZODB>=5.6",
        "ZConfig>=3.6",
        "persistent",
        "transaction",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-timeout",
            "hypothesis",
            "ZEO>=6",
            "msgpack",
            "zdaemon",
            "zope.testing",
            # TLS tests make their certificates at test time.
            "cryptography",
        ],
        "msgpack": ["msgpack"],
        # zeoctl: run the server as a daemon under zdaemon's manager.
        "daemon": ["zdaemon"],
    },
)
