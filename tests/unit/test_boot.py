from ramfw.boot import add_boot_command

CMD = "/opt/ramfw/scripts/wsl-boot"


def test_adds_a_boot_section_to_an_empty_file():
    assert add_boot_command("", CMD) == f'[boot]\ncommand = "{CMD}"\n'


def test_keeps_other_sections_and_is_idempotent():
    text = "[network]\ngenerateResolvConf = false\n"
    once = add_boot_command(text, CMD)
    assert once.startswith(text) and f'[boot]\ncommand = "{CMD}"' in once
    assert add_boot_command(once, CMD) == once


def test_joins_an_existing_boot_command():
    text = '[boot]\ncommand = "service cron start"\n[user]\ndefault = dev\n'
    assert add_boot_command(text, CMD) == f'[boot]\ncommand = "service cron start; {CMD}"\n[user]\ndefault = dev\n'


def test_adds_the_command_to_an_existing_boot_section():
    text = "[boot]\nsystemd = true\n"
    assert add_boot_command(text, CMD) == f'[boot]\ncommand = "{CMD}"\nsystemd = true\n'
