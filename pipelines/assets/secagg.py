"""A secure-aggregation round of this site, step by step: contribute, reveal after the deadline, unmask.

Not partitioned and not in the nightly job: a round is named by its round file (what governance
announces) and runs over a week of windows (docs/secagg.md). Each asset calls one
``qis_fhir.secagg.steps`` step, the one ``qis-fhir secagg`` calls, and fails with that step's message
outside its window (exit code 17's ``RoundWindowError``); ``secagg_contribution`` is materialized once
per contribution window (it posts whichever of advertise, shares, masked, consistency is due).
"""

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from pipelines.assets.metadata import asset_info
from pipelines.resources import DhtConfig, SiteConfig


class SecAggRound(Config):
    round_file: str  # the round reference (JSON), as for `qis-fhir secagg --round`
    state_dir: str  # where this site keeps its rounds between steps
    vector_file: str | None = None  # the site's input (1-D uint64 .npy), read when the round starts
    after: str | None = None  # value round: the round file of its presence round
    cells: int | None = None  # unmask a round this site did not take part in


def _setup(config: SecAggRound, site: SiteConfig, dht: DhtConfig):
    from qis_fhir.errors import InputNotFoundError
    from qis_fhir.secagg.steps import open_round

    if not site.network_dir:
        raise InputNotFoundError("a secure-aggregation round needs the network directory (QIS_NETWORK)")
    return open_round(config.round_file, network_dir=site.network_dir, state_dir=config.state_dir, bootstrap=dht.addresses(),
                      site_dir=site.site_dir, bind=dht.bind, after=config.after)


def _result(status: dict) -> MaterializeResult:
    return MaterializeResult(metadata={"status": MetadataValue.json(status)})


_INFO = asset_info("secagg", phi=False, uses_mapping=False)


@asset(group_name="secagg", kinds={"dht"}, **_INFO,
       description="This site's due contribution to the round (advertise, shares, masked or consistency), posted on the DHT.")
def secagg_contribution(context: AssetExecutionContext, config: SecAggRound, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
    from qis_fhir.secagg.steps import contribute_step, read_vector

    vector = None if config.vector_file is None else read_vector(config.vector_file)
    return _result(contribute_step(_setup(config, site, dht), vector))


@asset(group_name="secagg", kinds={"dht"}, **_INFO, deps=[secagg_contribution],
       description="This site's reveal, once the masked and consistency windows closed.")
def secagg_reveal(context: AssetExecutionContext, config: SecAggRound, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
    from qis_fhir.secagg.steps import reveal_step

    return _result(reveal_step(_setup(config, site, dht)))


@asset(group_name="secagg", kinds={"dht"}, **_INFO, deps=[secagg_reveal],
       description="The round's totals, unmasked after its last window (result.json, 0600, in the round's state folder).")
def secagg_totals(context: AssetExecutionContext, config: SecAggRound, site: SiteConfig, dht: DhtConfig) -> MaterializeResult:
    from qis_fhir.secagg.steps import unmask_step

    return _result(unmask_step(_setup(config, site, dht), config.cells))


SECAGG_ASSETS = [secagg_contribution, secagg_reveal, secagg_totals]
