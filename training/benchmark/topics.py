"""The benchmark's topics: what each prompt asks about, with the words its instructions use.

Each topic has a display name (always containing its noun), the noun's forms (the word an
"avoid the word" instruction forbids, with its plural), a neutral alias that replaces the noun when
an edit removes it, four topic keywords (for "include the keywords" / "use the word X n times"), and
four plain facts (full sentences without commas or abbreviations) used as filler when an edit needs
more text. `OOD_TOPICS` are held out of train and test_id.

    >>> len(ID_TOPICS) >= 40, len(OOD_TOPICS), set(ID_TOPICS) & set(OOD_TOPICS)
    (True, 10, set())
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One topic of the benchmark."""

    name: str
    """As it appears in a prompt ("the moon")."""
    noun: tuple[str, ...]
    """Forms of the topic's noun, singular first; `name` contains one of them."""
    alias: str
    """Replaces the noun when an edit must avoid it."""
    keywords: tuple[str, ...]
    facts: tuple[str, ...]

    @property
    def title(self) -> str:
        return " ".join(w.capitalize() for w in self.name.split())


def _t(name: str, noun: str, alias: str, keywords: str, *facts: str) -> Topic:
    return Topic(name, tuple(noun.split()), alias, tuple(keywords.split()), facts)


_ALL = [
    _t("the moon", "moon moons", "our natural satellite", "crater tide orbit phase",
       "The moon circles the Earth about once a month.", "There is no air to breathe on the moon.",
       "Its gravity pulls on the ocean and makes tides.", "The moon seems to change shape as it moves."),
    _t("honey bees", "bee bees", "these insects", "hive nectar pollen queen",
       "Honey bees live together in large colonies.", "They turn flower nectar into honey.",
       "Bees carry pollen from flower to flower.", "A bee dances to tell others where food is."),
    _t("volcanoes", "volcano volcanoes", "these fiery mountains", "lava ash magma eruption",
       "A volcano lets hot melted rock reach the surface.", "Many volcanoes sit where plates meet.",
       "Ash from a big eruption can travel very far.", "Some volcanoes sleep for centuries."),
    _t("the ocean", "ocean oceans", "the sea", "wave salt current coral",
       "The ocean covers most of our planet.", "Sea water is salty because of dissolved minerals.",
       "The ocean stores a huge amount of heat.", "Countless species live in the ocean."),
    _t("bicycles", "bicycle bicycles", "these two-wheelers", "pedal chain wheel helmet",
       "A bicycle is moved by the power of its rider.", "Pedals turn a chain that drives the back wheel.",
       "Riding a bicycle needs no fuel at all.", "Gears make steep hills easier to climb."),
    _t("coffee", "coffee coffees", "this drink", "bean roast caffeine cup",
       "Coffee is made from roasted seeds of a tropical plant.", "It contains caffeine that keeps people awake.",
       "Most coffee grows in warm regions near the equator.", "There are many ways to brew a cup."),
    _t("rainbows", "rainbow rainbows", "these bands of colour", "color light droplet arc",
       "A rainbow appears when sunlight meets falling rain.", "Light bends inside each water droplet.",
       "The colors always show up in the same order.", "You see a rainbow with the sun behind you."),
    _t("libraries", "library libraries", "such places", "book librarian shelf card",
       "A library lends books to the people who visit.", "Many libraries offer quiet rooms for study.",
       "Most public libraries are free to use.", "Librarians help readers find what they need."),
    _t("penguins", "penguin penguins", "these birds", "ice flipper colony egg",
       "Penguins are birds that cannot fly.", "They use their flippers to swim very fast.",
       "Most penguins live in the southern half of the world.", "Penguins huddle together to stay warm."),
    _t("trains", "train trains", "these locomotives", "rail station ticket engine",
       "Trains run on steel rails between stations.", "A single train can carry hundreds of people.",
       "Many modern trains are powered by electricity.", "Trains link cities across whole countries."),
    _t("gardening", "garden gardens gardening", "growing plants", "soil seed compost weed",
       "Plants in a garden need water and sunlight.", "Healthy soil feeds the roots of every plant.",
       "Weeds compete with crops for light and space.", "Compost makes the ground richer over time."),
    _t("chess", "chess", "the game", "king pawn board checkmate",
       "Chess is played on a board of sixty four squares.", "Each player starts with sixteen pieces.",
       "The goal is to trap the other king.", "Many games of chess end in a draw."),
    _t("deserts", "desert deserts", "dry lands", "sand cactus dune heat",
       "A desert gets very little rain each year.", "Days can be hot while nights turn cold.",
       "Cactus plants store water in their thick stems.", "Wind shapes sand into tall dunes."),
    _t("rain forests", "forest forests", "the jungle", "canopy parrot humidity vine",
       "Rain forests get rain on most days of the year.", "The tall canopy blocks much of the sunlight.",
       "Half of all animal species may live in rain forests.", "Vines climb the trees to reach the light."),
    _t("the human heart", "heart hearts", "this organ", "blood pulse artery muscle",
       "The heart pumps blood through the whole body.", "It is a muscle about the size of a fist.",
       "A resting heart beats around seventy times a minute.", "Arteries carry blood away from the heart."),
    _t("bread baking", "bread breads", "the loaf", "dough yeast oven flour",
       "Bread is made from flour and water and salt.", "Yeast makes the dough rise and become airy.",
       "Kneading builds strength in the dough.", "A hot oven gives bread a golden crust."),
    _t("electric cars", "car cars", "these vehicles", "battery charger motor range",
       "Electric cars run on power stored in a battery.", "An electric motor makes almost no noise.",
       "Drivers plug the car in to charge it.", "The range of electric cars keeps growing."),
    _t("photography", "photography photograph photographs", "picture taking", "camera lens shutter exposure",
       "Photography captures light to make an image.", "A lens focuses light onto a sensor or film.",
       "The shutter decides how long light comes in.", "Good photos often depend on soft light."),
    _t("the piano", "piano pianos", "the instrument", "key chord melody pedal",
       "A piano has eighty eight keys.", "Each key moves a hammer that strikes a string.",
       "Pedals let notes ring longer or softer.", "The piano can play melody and harmony at once."),
    _t("mountains", "mountain mountains", "high peaks", "peak glacier summit altitude",
       "Mountains form when parts of the crust are pushed up.", "The air gets thinner at high altitude.",
       "Snow stays on the tallest peaks all year.", "Climbers train for months to reach a summit."),
    _t("owls", "owl owls", "these hunters of the dark", "feather night hoot prey",
       "Owls hunt mostly at night.", "Their soft feathers let them fly almost silently.",
       "An owl can turn its head very far around.", "Owls swallow small prey whole."),
    _t("recycling", "recycling recycle", "reuse of waste", "plastic bin glass paper",
       "Recycling turns used materials into new products.", "Paper and glass and metal are often recycled.",
       "Sorting waste at home makes recycling easier.", "Recycling saves energy and raw materials."),
    _t("the internet", "internet", "the web of computers", "network router website data",
       "The internet links billions of devices.", "Data travels in small packets between computers.",
       "A router directs traffic in a home network.", "Websites are stored on servers around the world."),
    _t("tea", "tea teas", "this brew", "leaf kettle herbal green",
       "Tea is made by steeping leaves in hot water.", "Green and black tea come from the same plant.",
       "Herbal drinks are often called tea as well.", "Tea has been enjoyed for thousands of years."),
    _t("dinosaurs", "dinosaur dinosaurs", "these ancient reptiles", "fossil reptile extinction bone",
       "Dinosaurs lived for more than one hundred million years.", "We know them from fossil bones.",
       "Birds are the living relatives of dinosaurs.", "A giant impact ended their long reign."),
    _t("sleep", "sleep", "slumber", "dream night pillow rest",
       "Sleep lets the body and brain recover.", "Adults need about eight hours of sleep.",
       "Most dreams happen in deep stages of sleep.", "A dark quiet room helps people sleep."),
    _t("soccer", "soccer", "the sport", "goal ball team referee",
       "Soccer is played by two teams of eleven.", "Players may not touch the ball with their hands.",
       "A referee makes sure the rules are followed.", "Soccer is the most popular sport on Earth."),
    _t("the planets", "planet planets", "these worlds", "orbit gravity ring telescope",
       "Eight planets travel around our sun.", "Jupiter is the largest planet of all.",
       "Saturn is famous for its bright rings.", "Gravity keeps each planet in its orbit."),
    _t("bridges", "bridge bridges", "these crossings", "steel river arch engineer",
       "A bridge carries a road across a gap.", "Engineers design bridges to carry heavy loads.",
       "Some bridges hang from strong steel cables.", "Stone arch bridges can last for centuries."),
    _t("cheese", "cheese cheeses", "this dairy food", "milk cave goat rind",
       "Cheese is made by curdling milk.", "Some cheese ages for years in cool caves.",
       "Goat and sheep milk make cheese too.", "There are thousands of kinds of cheese."),
    _t("whales", "whale whales", "these sea giants", "song krill calf blubber",
       "Whales are mammals that breathe air.", "The blue whale is the largest animal ever known.",
       "Some whales sing long songs to each other.", "A thick layer of blubber keeps them warm."),
    _t("snow", "snow", "frozen flakes", "flake winter sled ice",
       "Snow forms when water vapor freezes in clouds.", "Every flake has six sides.",
       "Fresh snow can muffle sound.", "Children love to ride sleds on snowy hills."),
    _t("clocks", "clock clocks", "timekeepers", "hour gear alarm pendulum",
       "A clock shows the time of day.", "Old clocks used a swinging pendulum.",
       "Gears inside move the hands at set speeds.", "An alarm can wake people at a chosen hour."),
    _t("museums", "museum museums", "such collections", "exhibit painting curator gallery",
       "A museum keeps objects of art and history.", "Curators choose what goes into each exhibit.",
       "Many museums offer free days for visitors.", "Old paintings need careful light and air."),
    _t("kites", "kite kites", "these flying toys", "wind string tail sky",
       "A kite flies when wind pushes against it.", "The string lets the flyer steer it.",
       "A long tail helps keep the kite steady.", "Kites were first made thousands of years ago."),
    _t("letters and stamps", "letter letters", "written notes", "stamp envelope mail postman",
       "A letter is a written message sent by mail.", "A stamp pays for the trip of the letter.",
       "The envelope carries the address of the reader.", "Handwritten letters feel personal."),
    _t("farming", "farm farms farming", "agriculture", "tractor crop harvest barn",
       "Farming produces most of the food we eat.", "Farmers plant crops in spring.",
       "The harvest comes at the end of summer.", "Tractors do work that once took many hands."),
    _t("maps", "map maps", "such charts", "scale compass legend road",
       "A map shows a place from above.", "The scale tells how far apart things are.",
       "A legend explains the symbols used.", "A compass rose shows which way is north."),
    _t("lighthouses", "lighthouse lighthouses", "these coastal towers", "lamp ship coast keeper",
       "A lighthouse warns ships of danger near the coast.", "Its bright lamp turns to sweep the sea.",
       "Keepers once lived inside the tower.", "Most lighthouses now run by themselves."),
    _t("robots", "robot robots", "these machines", "sensor motor program arm",
       "Robots are machines that follow a program.", "Sensors let a robot notice its surroundings.",
       "Factory robots build cars and phones.", "Some robots explore places people cannot go."),
    _t("pizza", "pizza pizzas", "this dish", "dough oven tomato slice",
       "Pizza started in the Italian city of Naples.", "A classic pizza has tomato and cheese.",
       "Very hot ovens bake pizza in minutes.", "People add all kinds of toppings to pizza."),
    _t("butterflies", "butterfly butterflies", "these insects", "wing caterpillar nectar flower",
       "A butterfly starts life as a caterpillar.", "Its wings are covered in tiny scales.",
       "Butterflies drink nectar from flowers.", "Some butterflies travel thousands of miles."),
    _t("swimming", "swim swimming swimmer swimmers", "moving through water", "pool stroke lap goggles",
       "Swimming works almost every muscle in the body.", "Freestyle is the fastest stroke.",
       "Goggles protect the eyes in the pool.", "Learning to swim young is a useful skill."),
    # Held out of train and test_id (test_ood only).
    _t("glaciers", "glacier glaciers", "these frozen rivers", "ice crevasse meltwater valley",
       "A glacier is a huge mass of slowly moving ice.", "Glaciers carve deep valleys over time.",
       "Deep cracks called crevasses open on the surface.", "Many glaciers are shrinking as the climate warms."),
    _t("hot air balloons", "balloon balloons", "these aircraft", "burner basket flight wind",
       "A hot air balloon rises because warm air is light.", "A burner heats the air inside the envelope.",
       "Passengers ride in a basket below.", "The pilot steers by finding winds at different heights."),
    _t("castles", "castle castles", "these fortresses", "tower moat knight wall",
       "Castles were built to defend land and people.", "Thick stone walls kept attackers out.",
       "A moat of water made walls harder to reach.", "Knights and servants lived inside the walls."),
    _t("submarines", "submarine submarines", "these underwater vessels", "sonar depth periscope hull",
       "A submarine can travel deep under the sea.", "It fills tanks with water to dive.",
       "Sonar helps the crew find their way.", "A periscope lets sailors look above the waves."),
    _t("bamboo", "bamboo bamboos", "this tall plant", "panda stalk shoot grass",
       "Bamboo is the fastest growing plant on Earth.", "It is a kind of grass with a hollow stalk.",
       "Giant pandas eat bamboo almost all day.", "People build houses and furniture from it."),
    _t("jazz music", "jazz", "this style of music", "saxophone rhythm improvisation band",
       "Jazz was born in New Orleans.", "Players often make up music on the spot.",
       "The saxophone is a classic jazz instrument.", "Swing rhythm gives jazz its bounce."),
    _t("lightning", "lightning", "the electric flash", "thunder storm bolt electricity",
       "Lightning is a giant spark of electricity.", "Thunder is the sound of air heated by a bolt.",
       "A single flash is hotter than the surface of the sun.", "Tall objects are struck most often."),
    _t("origami", "origami", "the folding art", "paper fold crane crease",
       "Origami is the art of folding paper.", "Most models start from a single square sheet.",
       "The paper crane is a famous design.", "No glue or scissors are used."),
    _t("tornadoes", "tornado tornadoes", "these storms", "funnel storm wind siren",
       "A tornado is a spinning column of air.", "It reaches down from a thunderstorm to the ground.",
       "Winds inside can top three hundred miles an hour.", "Sirens warn towns when one is near."),
    _t("coral reefs", "reef reefs", "these underwater gardens", "polyp fish diver lagoon",
       "Coral reefs are built by tiny animals called polyps.", "Reefs shelter a quarter of all sea fish.",
       "Warm clear shallow water suits them best.", "Divers travel far to see bright reefs."),
]

TOPICS: dict[str, Topic] = {t.name: t for t in _ALL}
OOD_TOPICS: tuple[str, ...] = ("glaciers", "hot air balloons", "castles", "submarines", "bamboo", "jazz music",
                               "lightning", "origami", "tornadoes", "coral reefs")
ID_TOPICS: tuple[str, ...] = tuple(name for name in TOPICS if name not in OOD_TOPICS)
